"""The `image-geolocation` pipeline: images in, ranked (latitude, longitude, probability) out.

It only calls `model.geolocate(pixel_values=..., top_k=...)`, so it serves every model of this package
(GeoCLIP, GeoHier). Importing `modeling_geoclip` registers it with `transformers.pipeline`.
"""

from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

TASK = "image-geolocation"


class ImageGeolocationPipeline(Pipeline):
    """Predict where photos were taken.

    Inputs are what `modeling_geoclip.load_image` reads (file paths, bytes, PIL images, numpy arrays), one or a
    list. Each image gets a list of `top_k` dicts `{"latitude", "longitude", "probability"}`, best first
    (degrees; the model's probability of each prediction). An unreadable image raises `ValueError` naming it.

    Example:
        >>> import modeling_geoclip  # registers the task
        >>> from transformers import pipeline
        >>> geolocator = pipeline("image-geolocation", model="path/to/geoclip")  # doctest: +SKIP
        >>> geolocator("photo.jpg", top_k=3)  # doctest: +SKIP
        [{'latitude': 48.85, 'longitude': 2.35, 'probability': 0.41}, ...]
        >>> geolocator(["a.jpg", "b.jpg"], batch_size=8)  # one list per image  # doctest: +SKIP
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(self, top_k=None):
        return {}, ({} if top_k is None else {"top_k": top_k}), {}

    def preprocess(self, image):
        return self.image_processor(image, return_tensors="pt")

    def _forward(self, model_inputs, top_k=5):
        output = self.model.geolocate(pixel_values=model_inputs["pixel_values"], top_k=top_k)
        return {"latitudes": output.latitudes, "longitudes": output.longitudes, "probabilities": output.probabilities}

    def postprocess(self, model_outputs):
        rows = zip(*(model_outputs[key][0].tolist() for key in ("latitudes", "longitudes", "probabilities")))
        return [{"latitude": lat, "longitude": lon, "probability": p} for lat, lon, p in rows]


PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=ImageGeolocationPipeline, pt_model=AutoModel, type="image")

__all__ = ["ImageGeolocationPipeline", "TASK"]
