"""geoloc: everything around the models (CLI, data, geodesy, geocells, training, evaluation, publishing).

Importing it registers both model families with the transformers Auto classes.
"""

import modeling_geoclip  # noqa: F401  (registers GeoCLIP with the Auto classes and the pipeline)
import modeling_geohier  # noqa: F401  (registers GeoHier with AutoConfig / AutoModel)
from transformers import AutoImageProcessor

# GeoHier checkpoints ship GeoCLIP's image processor (saved by geoloc's training / publishing code).
AutoImageProcessor.register(
    modeling_geohier.GeoHierConfig, image_processor_classes={"pil": modeling_geoclip.GeoCLIPImageProcessor}, exist_ok=True
)

__version__ = "0.1.0"
