# Generated from geo_core/pipeline_geolocation.py by `python geoloc/hub/remote_code.py --sync`; do not edit.
"""The `image-geolocation` pipeline: images in, ranked (latitude, longitude, probability) out.

One implementation for both models (it only calls `model.geolocate`), shipped with every published repo (its
`config.json` names it in `custom_pipelines`), so that `pipeline(model=REPO, trust_remote_code=True)` serves a
model without the `geoloc` package; `geoloc.pipeline` registers the same class for installed use.

Example:
    >>> from transformers import pipeline
    >>> geolocate = pipeline(model="me/geoclip-vit-l14", trust_remote_code=True)  # doctest: +SKIP
    >>> geolocate("photo.jpg", top_k=3)  # [{"latitude", "longitude", "probability"}, ...] best first  # doctest: +SKIP
"""

import torch
from transformers import Pipeline

TASK = "image-geolocation"


class ImageGeolocationPipeline(Pipeline):
    """Predict where photos were taken.

    Inputs are what the model's image processor reads (file paths, bytes, PIL images, numpy arrays), one or a
    list. Each image gets a list of `top_k` dicts `{"latitude", "longitude", "probability"}`, best first
    (degrees; the model's probability of each candidate). An unreadable image raises `ValueError` naming it.
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
        # Tensors (B, top_k), so that the pipeline's batching can split them per image.
        with torch.no_grad():
            output = self.model.geolocate(pixel_values=model_inputs["pixel_values"].to(self.model.dtype), top_k=top_k)
        return {key: getattr(output, key) for key in ("latitudes", "longitudes", "probabilities")}

    def postprocess(self, model_outputs):
        rows = zip(*(model_outputs[key][0].tolist() for key in ("latitudes", "longitudes", "probabilities")))
        return [{"latitude": lat, "longitude": lon, "probability": p} for lat, lon, p in rows]


def custom_pipelines_entry() -> dict:
    """The `custom_pipelines` value of a published `config.json` (what `pipeline(model=REPO,
    trust_remote_code=True)` reads to find this class in the repo)."""
    return {TASK: {"impl": f"{__name__.rsplit('.', 1)[-1]}.{ImageGeolocationPipeline.__name__}", "pt": ["AutoModel"],
                   "tf": [], "type": "image"}}
