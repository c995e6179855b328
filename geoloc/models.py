"""The model families geoloc serves, registered with the transformers Auto classes by one function.

`MODEL_FAMILIES` lists them (one entry per family: a new model adds one). `register_models()` registers GeoCLIP
(and its standalone location encoder) and GeoHier with `AutoConfig`,
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


from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    """A model family: its `model_type`, the package folder that holds its code (pushed to the Hub as remote code),
    the name cards and messages use, and the class names of its config, model and image processor (plus extra
    `(config, model)` pairs registered with the Auto classes but not published on their own)."""

    model_type: str
    package: str
    name: str
    config: str
    model: str
    image_processor: str
    extra: tuple = ()


# The one list of model families: registration, remote code, shared-module copies, cards and the Space read it.
MODEL_FAMILIES = (
    ModelFamily("geoclip", "modeling_geoclip", "GeoCLIP", "GeoCLIPConfig", "GeoCLIPModel", "GeoCLIPImageProcessor",
                extra=(("GeoCLIPLocationEncoderConfig", "GeoCLIPLocationEncoder"),)),
    ModelFamily("geohier", "modeling_geohier", "GeoHier", "GeoHierConfig", "GeoHierModel", "GeoHierImageProcessor"),
)
MODEL_PACKAGES = tuple(family.package for family in MODEL_FAMILIES)


def register_models() -> None:
    """Register every model family and the `image-geolocation` pipeline task (idempotent)."""
    import importlib

    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    for family in MODEL_FAMILIES:
        package = importlib.import_module(family.package)
        for config_name, model_name, processor_name in ((family.config, family.model, family.image_processor),
                                                        *((config, model, None) for config, model in family.extra)):
            config_class, model_class = getattr(package, config_name), getattr(package, model_name)
            AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
            AutoModel.register(config_class, model_class, exist_ok=True)
            if processor_name is not None:
                AutoImageProcessor.register(config_class, image_processor_classes={"pil": getattr(package, processor_name)},
                                            exist_ok=True)
    from .pipeline import register_pipeline  # after the models: the pipeline module imports the adapter

    register_pipeline()


__all__ = ["MODEL_FAMILIES", "MODEL_PACKAGES", "ModelFamily", "register_models"]
