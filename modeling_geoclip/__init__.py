"""GeoCLIP as a transformers model. Importing this package registers it with the Auto classes (the
`image-geolocation` pipeline, which serves every model, is registered by `geoloc.pipeline`)."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_geoclip import GeoCLIPConfig, GeoCLIPLocationEncoderConfig
from .geo_common import GeolocationOutput, check_top_k, validate_locations
from .geo_image_processing import load_image
from .modeling_geoclip import GeoCLIPLocationEncoder, GeoCLIPModel, GeoCLIPOutput
from .processing_geoclip import GeoCLIPImageProcessor, byte_level_clip_tokenizer

AutoConfig.register(GeoCLIPConfig.model_type, GeoCLIPConfig, exist_ok=True)
AutoConfig.register(GeoCLIPLocationEncoderConfig.model_type, GeoCLIPLocationEncoderConfig, exist_ok=True)
AutoModel.register(GeoCLIPConfig, GeoCLIPModel, exist_ok=True)
AutoModel.register(GeoCLIPLocationEncoderConfig, GeoCLIPLocationEncoder, exist_ok=True)
AutoImageProcessor.register(GeoCLIPConfig, image_processor_classes={"pil": GeoCLIPImageProcessor}, exist_ok=True)

__all__ = [
    "GeoCLIPConfig",
    "GeoCLIPImageProcessor",
    "GeoCLIPLocationEncoder",
    "GeoCLIPLocationEncoderConfig",
    "GeoCLIPModel",
    "GeoCLIPOutput",
    "GeolocationOutput",
    "byte_level_clip_tokenizer",
    "check_top_k",
    "load_image",
    "validate_locations",
]
