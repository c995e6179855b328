"""What the Gradio Space (`spaces/geolocation/app.py`) needs from the package, and `geoloc space`.

- `load_geolocators()` loads the models named by `GEOLOC_MODEL` (comma-separated Hub ids or local folders).
  Without it the Space runs the bundled toy model `geoloc/assets/geoclip-worldmap-tiny/`, or, where that is
  missing, a randomly initialised tiny GeoCLIP; each `Geolocator.note` says which, for the page's banner.
- `Geolocator.from_image` / `from_text` make one `model.geolocate(...)` call, whatever the model, and return a
  `Prediction`. Extras come from what the model offers: a probability heat layer where it has a retrieval
  gallery (GeoCLIP), the scene and per-level attention maps where `geolocate` returns scene probabilities and
  takes `output_attentions` (GeoHier: the same forward pass gives the top-k and the maps).
- `prediction_table` and `world_map` turn a `Prediction` into the page's table and plotly map. The map is a
  MapLibre map whose only base layer is the bundled Natural Earth raster: it draws without a token and
  without any network access (no tile server), in a Space as in an offline test.
- `geoloc space OUTPUT_DIR` assembles a folder ready to upload as a Space (see `spaces/geolocation/README.md`).

Example:
    >>> geolocator = load_geolocators("")[0]  # bundled or random tiny model  # doctest: +SKIP
    >>> prediction = geolocator.from_text("a beach with palm trees", top_k=3)  # doctest: +SKIP
    >>> prediction_table(prediction).columns.tolist()  # doctest: +SKIP
    ['rank', 'nearest place', 'country', 'km to place', 'probability', 'lat, lon', 'latitude', 'longitude']
"""

import argparse
import base64
import inspect
import io
import math
import os
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import reverse_geocode
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from modeling_geoclip import GeoCLIPImageProcessor, GeoCLIPModel, byte_level_clip_tokenizer, check_top_k

from .configs import TINY_IMAGE_SIZE, tiny_geoclip_config
from .geodesy import geodesic_distance_km
from .worldmap import load_world_map, sample_points

MODEL_ENV = "GEOLOC_MODEL"
BUNDLED_MODEL = Path(__file__).parent / "assets" / "geoclip-worldmap-tiny"
RANDOM_GALLERY_SIZE = 4096
HEAT_POINTS = 3000  # the most probable gallery points drawn as the heat layer
MAX_TOP_K = 20  # places listed at most
MAX_TEXT_CHARS = 300
TABLE_COLUMNS = ["rank", "nearest place", "country", "km to place", "probability", "lat, lon", "latitude",
                 "longitude"]
MERCATOR_MAX_LATITUDE = 85.0511287798066  # Web Mercator's edge: the square world tile of MapLibre

NOTES = {
    "configured": "",
    "bundled": (
        "No model is configured (set GEOLOC_MODEL to Hub ids or folders), so this page runs the small bundled "
        "demo model geoclip-worldmap-tiny. It was trained only on crops of a Natural Earth map: it can place map "
        "crops like the examples, not photos or descriptions."
    ),
    "random": (
        "No model is configured (set GEOLOC_MODEL to Hub ids or folders) and the bundled demo model is not "
        "installed, so this page runs a randomly initialised tiny GeoCLIP: its answers are random."
    ),
}


@dataclass
class Prediction:
    """One query's answer, ready for display.

    Args:
        latitudes, longitudes, probabilities (`np.ndarray` of shape `(top_k,)`): the model's top-k, best first.
        heat (`np.ndarray` of shape `(N, 3)`, *optional*): (latitude, longitude, probability) of the N most
            probable gallery points, for models that retrieve from a gallery.
        scenes (`dict[str, float]`, *optional*): scene name -> probability, for models that predict scenes.
        attention (`list[tuple[PIL.Image.Image, str]]`): per hierarchy level, the model's input image with its
            cross-attention drawn over it, and a caption (empty unless the model returns attention maps).
    """

    latitudes: np.ndarray
    longitudes: np.ndarray
    probabilities: np.ndarray
    heat: np.ndarray | None = None
    scenes: dict[str, float] | None = None
    attention: list[tuple[Image.Image, str]] = field(default_factory=list)


@dataclass
class Geolocator:
    """A model with its image processor and (for text queries) tokenizer, under the name the page shows."""

    name: str
    model: torch.nn.Module
    image_processor: GeoCLIPImageProcessor
    tokenizer: object | None
    note: str = ""

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, note: str = "") -> "Geolocator":
        """Load a GeoCLIP or GeoHier checkpoint (Hub id or folder) with the processors saved next to it."""
        model = AutoModel.from_pretrained(source).eval()
        wants_tokenizer = getattr(model.config, "use_text_tower", False)
        return cls(
            name=str(source),
            model=model,
            image_processor=AutoImageProcessor.from_pretrained(source),
            tokenizer=AutoTokenizer.from_pretrained(source) if wants_tokenizer else None,
            note=note,
        )

    @classmethod
    def random_tiny(cls) -> "Geolocator":
        """A randomly initialised tiny GeoCLIP (seeded) with a random gallery: the last-resort default."""
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = GeoCLIPModel(tiny_geoclip_config()).eval()
        model.set_gallery(sample_points(RANDOM_GALLERY_SIZE, np.random.default_rng(0)))
        side = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
        return cls(
            name="random tiny GeoCLIP",
            model=model,
            image_processor=GeoCLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size=side),
            tokenizer=byte_level_clip_tokenizer(),
            note=NOTES["random"],
        )

    def from_image(self, image, top_k: int) -> Prediction:
        """Geolocate one image (path, bytes, numpy array or PIL image; decoded by `load_image`).

        Raises:
            ValueError: for an unreadable or oversized image, or a bad `top_k`.
        """
        pixel_values = self.image_processor(image, return_tensors="pt").pixel_values
        extra = {"output_attentions": True} if self.has_attention_maps else {}
        prediction, output = self._geolocate(top_k, pixel_values=pixel_values, **extra)
        if self.has_attention_maps:
            prediction.attention = self._attention_overlays(pixel_values, output)
        return prediction

    @property
    def has_attention_maps(self) -> bool:
        """Whether the model's `geolocate` returns cross-attention maps over the image (GeoHier's queries)."""
        return "output_attentions" in inspect.signature(self.model.geolocate).parameters

    def from_text(self, text: str, top_k: int) -> Prediction:
        """Geolocate a description such as "a beach with palm trees and volcanic rock".

        Raises:
            ValueError: for empty or over-long text, a model without a text encoder, or a bad `top_k`.
        """
        if self.tokenizer is None:
            raise ValueError(f"The model {self.name} reads images only: it has no text encoder.")
        text = (text or "").strip()
        if not text:
            raise ValueError("The text is empty: describe a place, e.g. 'a beach with palm trees and volcanic rock'.")
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"The text is too long ({len(text)} characters): keep it under {MAX_TEXT_CHARS}.")
        tokens = self.tokenizer(text, return_tensors="pt")
        limit = self.tokenizer.model_max_length
        if tokens.input_ids.shape[1] > limit:
            raise ValueError(
                f"The text is too long for this model ({tokens.input_ids.shape[1]} tokens, it reads at most "
                f"{limit}): shorten it."
            )
        return self._geolocate(top_k, input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)[0]

    def _geolocate(self, top_k: int, **inputs) -> tuple[Prediction, object]:
        """One `model.geolocate` call -> the `Prediction` (with a gallery, also the most probable points for the
        heat layer) and the model's raw output."""
        top_k = check_top_k(top_k, MAX_TOP_K)  # the model checks it against its own number of candidates
        gallery_size = getattr(self.model.config, "gallery_size", 0)
        output = self.model.geolocate(**inputs, top_k=max(top_k, min(HEAT_POINTS, gallery_size)))
        latitudes, longitudes, probabilities = (
            x[0].double().cpu().numpy() for x in (output.latitudes, output.longitudes, output.probabilities)
        )
        scene_probabilities = getattr(output, "scene_probabilities", None)
        return Prediction(
            latitudes=latitudes[:top_k],
            longitudes=longitudes[:top_k],
            probabilities=probabilities[:top_k],
            heat=np.stack([latitudes, longitudes, probabilities], axis=1) if gallery_size else None,
            scenes=None if scene_probabilities is None else self._scene_names(scene_probabilities[0]),
        ), output

    def _scene_names(self, probabilities: torch.Tensor) -> dict[str, float]:
        """Scene probabilities keyed by the config's `id2label` names when it has one per scene."""
        labels = self.model.config.id2label
        named = len(labels) == len(probabilities)
        return {labels[i] if named else f"scene {i}": float(p) for i, p in enumerate(probabilities.tolist())}

    @torch.no_grad()
    def _attention_overlays(self, pixel_values: torch.Tensor, output) -> list[tuple[Image.Image, str]]:
        """Last decoder layer's cross-attention (mean over heads) of the chosen scene's query at each level,
        drawn in red over the image the model saw (min-max scaled: red marks where it looked most).

        Args:
            output: the `geolocate(..., output_attentions=True)` answer for `pixel_values` (no second forward).
        """
        num_levels = output.cross_attentions.shape[3] // output.scene_probabilities.shape[1]
        scene = int(output.selected_scenes[0])
        patches = output.cross_attentions[0, -1].float().mean(0)[:, 1:]  # drop the [CLS] token
        side = math.isqrt(patches.shape[1])
        mean = torch.tensor(self.image_processor.image_mean)[:, None, None]
        std = torch.tensor(self.image_processor.image_std)[:, None, None]
        pixels = ((pixel_values[0].float() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        base = Image.fromarray(pixels).resize((224, 224), Image.Resampling.BICUBIC)
        overlays = []
        for level in range(num_levels):
            weights = patches[scene * num_levels + level].reshape(side, side)
            weights = (weights - weights.min()) / (weights.max() - weights.min()).clamp_min(1e-12)
            weights = (weights * 160).byte().numpy()  # opacity of the red: up to 160/255 where attention peaks
            mask = Image.fromarray(weights).resize(base.size, Image.Resampling.BILINEAR)
            overlay = Image.composite(Image.new("RGB", base.size, (220, 20, 20)), base, mask)
            depth = "coarsest" if level == 0 else "finest" if level == num_levels - 1 else "middle"
            overlays.append((overlay, f"level {level + 1} of {num_levels} ({depth})"))
        return overlays


def load_geolocators(spec: str | None = None) -> list[Geolocator]:
    """The models the Space offers, first one the default.

    Args:
        spec: comma-separated Hub ids or local folders; defaults to the `GEOLOC_MODEL` environment variable.
            Empty: the bundled demo model if installed, else a random tiny GeoCLIP.
    """
    spec = os.environ.get(MODEL_ENV, "") if spec is None else spec
    sources = [source.strip() for source in spec.split(",") if source.strip()]
    if sources:
        return [Geolocator.from_pretrained(source, NOTES["configured"]) for source in sources]
    if (BUNDLED_MODEL / "config.json").is_file():
        geolocator = Geolocator.from_pretrained(BUNDLED_MODEL, NOTES["bundled"])
        geolocator.name = "geoclip-worldmap-tiny (bundled demo)"
        return [geolocator]
    return [Geolocator.random_tiny()]


def nearest_places(latitudes, longitudes) -> list[dict]:
    """Nearest populated place of each point from the offline GeoNames gazetteer (`reverse_geocode`), with
    `km`, its geodesic distance; far out at sea the nearest place can be hundreds of km away."""
    places = reverse_geocode.search(list(zip(latitudes, longitudes)))
    distances = geodesic_distance_km(latitudes, longitudes, [p["latitude"] for p in places],
                                     [p["longitude"] for p in places])
    return [{**place, "km": float(km)} for place, km in zip(places, distances)]


def prediction_table(prediction: Prediction) -> pd.DataFrame:
    """The top-k as a table (`TABLE_COLUMNS`), best first: the nearest place and its distance, the
    probability, a copyable "lat, lon" text and the coordinates as numbers."""
    places = nearest_places(prediction.latitudes, prediction.longitudes)
    rows = [
        [rank, place["city"], place["country"], round(place["km"]), float(f"{p:.4g}"), f"{lat:.5f}, {lon:.5f}",
         round(lat, 5), round(lon, 5)]
        for rank, (lat, lon, p, place) in enumerate(
            zip(prediction.latitudes.tolist(), prediction.longitudes.tolist(), prediction.probabilities.tolist(),
                places), start=1)
    ]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


@lru_cache(maxsize=1)
def world_map_image() -> str:
    """The bundled Natural Earth raster reprojected to Web Mercator, as a JPEG data URL (about 70 kB)."""
    world = load_world_map()  # plate carree, 0.5 degrees per pixel, row 0 at 90 N
    size = world.shape[1]
    y = 1 - 2 * (np.arange(size) + 0.5) / size  # Mercator y of each output row, +1 at the top edge
    latitudes = np.degrees(np.arctan(np.sinh(np.pi * y)))
    rows = np.clip(((90 - latitudes) * world.shape[0] / 180).astype(int), 0, world.shape[0] - 1)
    buffer = io.BytesIO()
    Image.fromarray(world[rows]).save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def world_map(prediction: Prediction, labels: list[str] | None = None) -> go.Figure:
    """A MapLibre map of the top-k (markers sized by probability; rank, place and probability on hover) over
    the heat layer. Markers carry no text labels: those would fetch fonts from the internet.

    Args:
        labels: a hover label per prediction (e.g. the nearest place), best first.
    """
    figure = go.Figure()
    if prediction.heat is not None:
        figure.add_trace(go.Densitymap(
            lat=prediction.heat[:, 0], lon=prediction.heat[:, 1], z=prediction.heat[:, 2], radius=14,
            colorscale="YlOrRd", showscale=False, opacity=0.75, hoverinfo="skip", name="probability",
        ))
    probabilities = prediction.probabilities
    labels = labels or [""] * len(probabilities)
    figure.add_trace(go.Scattermap(
        lat=prediction.latitudes, lon=prediction.longitudes, mode="markers",
        marker=dict(size=10 + 30 * np.sqrt(probabilities / probabilities.max()), color="#1f4e9c", opacity=0.85),
        hovertext=[f"#{rank} {label}<br>{lat:.4f}, {lon:.4f}<br>p = {p:.3g}" for rank, (label, lat, lon, p)
                   in enumerate(zip(labels, prediction.latitudes, prediction.longitudes, probabilities), start=1)],
        hoverinfo="text", name="top-k",
    ))
    edge = MERCATOR_MAX_LATITUDE
    figure.update_layout(
        map=dict(
            style="white-bg", zoom=0, center=dict(lat=20, lon=float(prediction.longitudes[0])),
            layers=[dict(sourcetype="image", source=world_map_image(), below="traces",
                         coordinates=[[-180, edge], [180, edge], [180, -edge], [-180, -edge]])],
        ),
        margin=dict(l=0, r=0, t=0, b=0), height=460, showlegend=False,
    )
    return figure


# ------------------------------------------------------------------------------------- geoloc space
SPACE_SOURCE = Path(__file__).resolve().parents[1] / "spaces" / "geolocation"
PACKAGES = ("geoloc", "modeling_geoclip", "modeling_geohier")


def export_space(output_dir: str | os.PathLike) -> Path:
    """Copy the Space (`spaces/geolocation/`) and the package sources it imports into `output_dir`.

    The Space then runs without `geoloc` being installed: `app.py` imports the copied folders next to it, and
    `requirements.txt` installs their dependencies. Needs a source checkout of geoloc.
    """
    output_dir = Path(output_dir)
    if not SPACE_SOURCE.is_dir():
        raise ValueError(f"{SPACE_SOURCE} does not exist: run `geoloc space` from a source checkout of geoloc.")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ValueError(f"{output_dir} is not empty: give a new or empty folder.")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(SPACE_SOURCE, output_dir, ignore=ignore, dirs_exist_ok=True)
    for package in PACKAGES:
        shutil.copytree(SPACE_SOURCE.parents[1] / package, output_dir / package, ignore=ignore)
    return output_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geoloc space",
        description="Assemble the Gradio Space (app, examples, requirements and the package sources) in a "
        "folder ready to upload, e.g. `hf upload USER/SPACE OUTPUT_DIR --repo-type space`.",
    )
    parser.add_argument("output_dir", help="new or empty folder to write the Space into")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    print(f"Space written to {export_space(args.output_dir)}")
    return 0
