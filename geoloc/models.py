"""The model families geoloc serves, registered with the transformers Auto classes on import.

`modeling_geoclip` and `modeling_geohier` register their configs and models themselves; GeoHier checkpoints
written by geoloc carry GeoCLIP's image processor, registered for `GeoHierConfig` here. Every geoloc module
that loads checkpoints imports this one (`import geoloc` alone stays free of torch, so `geoloc --help` is fast).

Example:
    >>> import geoloc.models  # noqa: F401
    >>> from transformers import AutoModel
    >>> AutoModel.from_pretrained(geoloc.DEFAULT_MODEL).config.model_type
    'geoclip'
"""

import modeling_geoclip
import modeling_geohier
from transformers import AutoImageProcessor

AutoImageProcessor.register(
    modeling_geohier.GeoHierConfig, image_processor_classes={"pil": modeling_geoclip.GeoCLIPImageProcessor},
    exist_ok=True,
)
