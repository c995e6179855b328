"""The `image-geolocation` pipeline: images in, ranked (latitude, longitude, probability) out.

The class is the one every published repo ships as remote code (`geo_core/pipeline_geolocation.py`, copied into
each model folder): it calls `model.geolocate`, as the inference adapter does, so it answers like `geoloc predict`, the evaluator and
the Space, for every model of this package (GeoCLIP, GeoHier). Importing this module calls
`geoloc.models.register_models()`: both models and the task are registered with `transformers.pipeline`.

Example:
    >>> import geoloc.pipeline  # registers the task
    >>> from transformers import pipeline
    >>> geolocator = pipeline("image-geolocation", model=geoloc.DEFAULT_MODEL)
    >>> len(geolocator(np.zeros((32, 32, 3), dtype=np.uint8), top_k=3))
    3
    >>> geolocator(["a.jpg", "b.jpg"], batch_size=8)  # one list per image  # doctest: +SKIP
"""

from transformers import AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from geo_core.pipeline_geolocation import TASK, ImageGeolocationPipeline

from .models import register_models


def register_pipeline() -> None:
    """Register the `image-geolocation` task (part of `geoloc.models.register_models()`; idempotent)."""
    if TASK not in PIPELINE_REGISTRY.get_supported_tasks():  # registering again would log a warning
        PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=ImageGeolocationPipeline, pt_model=AutoModel,
                                            type="image")


register_models()  # `import geoloc.pipeline` is the documented way to get the task: it registers explicitly

__all__ = ["ImageGeolocationPipeline", "TASK", "register_pipeline"]
