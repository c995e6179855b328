"""The `image-geolocation` pipeline: images in, ranked (latitude, longitude, probability) out.

A `transformers` pipeline over `geoloc.inference.Geolocator`, so it answers exactly like `geoloc predict`, the
evaluator and the Space, for every model of this package (GeoCLIP, GeoHier). Importing this module calls
`geoloc.models.register_models()`: both models and the task are registered with `transformers.pipeline`.
"""

import numpy as np
import torch
from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .inference import Geolocator
from .models import register_models

TASK = "image-geolocation"


class ImageGeolocationPipeline(Pipeline):
    """Predict where photos were taken.

    Inputs are what `modeling_geoclip.load_image` reads (file paths, bytes, PIL images, numpy arrays), one or a
    list. Each image gets a list of `top_k` dicts `{"latitude", "longitude", "probability"}`, best first
    (degrees; the model's probability of each prediction). An unreadable image raises `ValueError` naming it
    (use `Geolocator.locate_images` to get per-image errors instead).

    Example:
        >>> import geoloc.pipeline  # registers the task
        >>> from transformers import pipeline
        >>> geolocator = pipeline("image-geolocation", model=geoloc.DEFAULT_MODEL)
        >>> len(geolocator(np.zeros((32, 32, 3), dtype=np.uint8), top_k=3))
        3
        >>> geolocator(["a.jpg", "b.jpg"], batch_size=8)  # one list per image  # doctest: +SKIP
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.geolocator = Geolocator(self.model, self.image_processor, self.tokenizer)

    def _sanitize_parameters(self, top_k=None):
        return {}, ({} if top_k is None else {"top_k": top_k}), {}

    def preprocess(self, image):
        return self.image_processor(image, return_tensors="pt")

    def _forward(self, model_inputs, top_k=5):
        # Tensors (B, top_k), so that the pipeline's batching can split them per image.
        results = self.geolocator.locate_pixel_values(model_inputs["pixel_values"], top_k)
        return {
            "latitudes": torch.from_numpy(np.stack([result.latitudes for result in results])),
            "longitudes": torch.from_numpy(np.stack([result.longitudes for result in results])),
            "probabilities": torch.from_numpy(np.stack([result.probabilities for result in results])),
        }

    def postprocess(self, model_outputs):
        rows = zip(*(model_outputs[key][0].tolist() for key in ("latitudes", "longitudes", "probabilities")))
        return [{"latitude": lat, "longitude": lon, "probability": p} for lat, lon, p in rows]


def register_pipeline() -> None:
    """Register the `image-geolocation` task (part of `geoloc.models.register_models()`; idempotent)."""
    if TASK not in PIPELINE_REGISTRY.get_supported_tasks():  # registering again would log a warning
        PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=ImageGeolocationPipeline, pt_model=AutoModel,
                                            type="image")


register_models()  # `import geoloc.pipeline` is the documented way to get the task: it registers explicitly

__all__ = ["ImageGeolocationPipeline", "TASK", "register_pipeline"]
