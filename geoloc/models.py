"""The model families geoloc serves, registered with the transformers Auto classes by one function.

`register_models()` registers GeoCLIP (and its standalone location encoder) and GeoHier with `AutoConfig`,
`AutoModel` and `AutoImageProcessor`, and the `image-geolocation` task with `transformers.pipeline`. Importing
a module registers nothing: every entry point that loads a checkpoint (each `geoloc` command, the Space,
`Geolocator.from_pretrained`, `geoloc.pipeline`) calls it first, so none depends on what happened to be
imported before. It is idempotent and cheap to call again.

Example:
    >>> from geoloc.models import register_models
    >>> register_models()
    >>> from transformers import AutoModel
    >>> AutoModel.from_pretrained(geoloc.DEFAULT_MODEL).config.model_type  # doctest: +SKIP
    'geoclip'
"""


def register_models() -> None:
    """Register both model families and the `image-geolocation` pipeline task (idempotent)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    from modeling_geoclip import GeoCLIPConfig, GeoCLIPImageProcessor, GeoCLIPLocationEncoder, GeoCLIPModel
    from modeling_geoclip import GeoCLIPLocationEncoderConfig
    from modeling_geohier import GeoHierConfig, GeoHierImageProcessor, GeoHierModel

    for config_class, model_class, processor_class in (
        (GeoCLIPConfig, GeoCLIPModel, GeoCLIPImageProcessor),
        (GeoCLIPLocationEncoderConfig, GeoCLIPLocationEncoder, None),
        (GeoHierConfig, GeoHierModel, GeoHierImageProcessor),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        if processor_class is not None:
            AutoImageProcessor.register(config_class, image_processor_classes={"pil": processor_class}, exist_ok=True)
    from .pipeline import register_pipeline  # after the models: the pipeline module imports the adapter

    register_pipeline()


__all__ = ["register_models"]
