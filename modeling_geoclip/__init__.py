"""GeoCLIP as a transformers model. Importing this package registers nothing: `geoloc.models.register_models()`
registers it (and GeoHier, and the `image-geolocation` pipeline) with the Auto classes; a published repo loads
through its `auto_map` with `trust_remote_code=True`."""

from .configuration_geoclip import GeoCLIPConfig, GeoCLIPLocationEncoderConfig
from .geo_common import GeolocationOutput, check_top_k, validate_locations
from .geo_image_processing import load_image
from .modeling_geoclip import GeoCLIPLocationEncoder, GeoCLIPModel, GeoCLIPOutput
from .image_processing_geoclip import GeoCLIPImageProcessor

__all__ = [
    "GeoCLIPConfig",
    "GeoCLIPImageProcessor",
    "GeoCLIPLocationEncoder",
    "GeoCLIPLocationEncoderConfig",
    "GeoCLIPModel",
    "GeoCLIPOutput",
    "GeolocationOutput",
    "check_top_k",
    "load_image",
    "validate_locations",
]
