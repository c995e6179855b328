"""geoloc: everything around the models (CLI, data, geodesy, geocells, training, evaluation, publishing).

Importing it registers both model families (config, model, image processor) with the transformers Auto classes.
"""

import modeling_geoclip  # noqa: F401  (registers GeoCLIP with the Auto classes and the pipeline)
import modeling_geohier  # noqa: F401  (registers GeoHier with the Auto classes)

__version__ = "0.1.0"
