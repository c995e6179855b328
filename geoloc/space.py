"""What the Gradio Space (`spaces/geolocation/app.py`) needs from the package, and `geoloc space`.

- `load_geolocators()` loads the models named by `GEOLOC_MODEL` (comma-separated Hub ids or local folders) as
  `geoloc.inference.Geolocator`s. Without it the Space runs the bundled toy model
  `geoloc/assets/geoclip-worldmap-tiny/`, or, where that is missing, a randomly initialised tiny GeoCLIP; the
  note it returns says which, for the page's banner.
- `locate_image` / `locate_text` ask the adapter for one answer with everything the page shows: the nearest
  places, and what the model declares (`Geolocator.capabilities`): uncertainty points drawn as a heat layer,
  GeoHier's scene (for models trained with scene labels) and per-level attention maps (the same forward pass
  gives the top-k and the maps). A bad input raises `ValueError` with a message for the visitor.
- `prediction_table` and `world_map` turn a `GeolocationResult` into the page's table and plotly map. The map
  is a MapLibre map whose only base layer is the bundled Natural Earth raster: it draws without a token and
  without any network access (no tile server), in a Space as in an offline test.
- `geoloc space OUTPUT_DIR` assembles a folder ready to upload as a Space (see `spaces/geolocation/README.md`).

Example:
    >>> (geolocator,), note = load_geolocators("")  # bundled or random tiny model  # doctest: +SKIP
    >>> result = locate_text(geolocator, "a beach with palm trees", top_k=3)  # doctest: +SKIP
    >>> prediction_table(result).columns.tolist()  # doctest: +SKIP
    ['rank', 'nearest place', 'country', 'km to place', 'probability', 'lat, lon', 'latitude', 'longitude']
"""

import argparse
import base64
import io
import os
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from PIL import Image

from modeling_geoclip import GeoCLIPImageProcessor, GeoCLIPModel, byte_level_clip_tokenizer, check_top_k

from .cli import HelpFormatter
from . import DEFAULT_MODEL
from .configs import TINY_IMAGE_SIZE, tiny_geoclip_config
from .inference import GeolocationResult, Geolocator, nearest_places
from .worldmap import load_world_map, sample_points

MODEL_ENV = "GEOLOC_MODEL"
BUNDLED_MODEL = DEFAULT_MODEL
RANDOM_GALLERY_SIZE = 4096
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


def random_tiny_geolocator() -> Geolocator:
    """A randomly initialised tiny GeoCLIP (seeded) with a random gallery: the last-resort default."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GeoCLIPModel(tiny_geoclip_config())
    model.set_gallery(sample_points(RANDOM_GALLERY_SIZE, np.random.default_rng(0)))
    side = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    processor = GeoCLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size=side)
    return Geolocator(model, processor, byte_level_clip_tokenizer(), name="random tiny GeoCLIP")


def load_geolocators(spec: str | None = None) -> tuple[list[Geolocator], str]:
    """The models the Space offers (first one the default) and the note the page shows about them.

    Args:
        spec: comma-separated Hub ids or local folders; defaults to the `GEOLOC_MODEL` environment variable.
            Empty: the bundled demo model if installed, else a random tiny GeoCLIP.
    """
    spec = os.environ.get(MODEL_ENV, "") if spec is None else spec
    sources = [source.strip() for source in spec.split(",") if source.strip()]
    if sources:
        return [Geolocator.from_pretrained(source) for source in sources], NOTES["configured"]
    if (Path(BUNDLED_MODEL) / "config.json").is_file():
        geolocator = Geolocator.from_pretrained(BUNDLED_MODEL)
        geolocator.name = "geoclip-worldmap-tiny (bundled demo)"
        return [geolocator], NOTES["bundled"]
    return [random_tiny_geolocator()], NOTES["random"]


def locate_image(geolocator: Geolocator, image, top_k: int) -> GeolocationResult:
    """One image (path, bytes, numpy array or PIL image) with everything the page shows.

    Raises:
        ValueError: for an unreadable or oversized image, or `top_k` outside 1..MAX_TOP_K.
    """
    check_top_k(top_k, MAX_TOP_K)
    return _the_answer(geolocator.locate_images([image], top_k, places=True, extras=True))


def locate_text(geolocator: Geolocator, text: str, top_k: int) -> GeolocationResult:
    """A description such as "a beach with palm trees and volcanic rock", as `locate_image` does images.

    Raises:
        ValueError: for empty or over-long text, a model without a text encoder, or a bad `top_k`.
    """
    check_top_k(top_k, MAX_TOP_K)
    text = (text or "").strip()
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"The text is too long ({len(text)} characters): keep it under {MAX_TEXT_CHARS}.")
    return _the_answer(geolocator.locate_texts([text], top_k, places=True, extras=True))


def _the_answer(results: list[GeolocationResult]) -> GeolocationResult:
    """The one result of a one-input call; its error, if any, raised for the page to show."""
    [result] = results
    if result.error:
        raise ValueError(result.error)
    return result


def prediction_table(result: GeolocationResult) -> pd.DataFrame:
    """The top-k as a table (`TABLE_COLUMNS`), best first: the nearest place and its distance, the
    probability, a copyable "lat, lon" text and the coordinates as numbers."""
    places = result.places or nearest_places(result.latitudes, result.longitudes)
    rows = [
        [rank, place["place"], place["country"], round(place["km"]), float(f"{p:.4g}"), f"{lat:.5f}, {lon:.5f}",
         round(lat, 5), round(lon, 5)]
        for rank, (lat, lon, p, place) in enumerate(
            zip(result.latitudes.tolist(), result.longitudes.tolist(), result.probabilities.tolist(), places),
            start=1)
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


def world_map(prediction: GeolocationResult, labels: list[str] | None = None) -> go.Figure:
    """A MapLibre map of the top-k (markers sized by probability; rank, place and probability on hover) over
    the heat layer of the uncertainty points. Markers carry no text labels: those would fetch fonts from the
    internet.

    Args:
        labels: a hover label per prediction (e.g. the nearest place), best first.
    """
    figure = go.Figure()
    heat = prediction.uncertainty
    if heat is not None:
        figure.add_trace(go.Densitymap(
            lat=heat[:, 0], lon=heat[:, 1], z=heat[:, 2], radius=14,
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
        formatter_class=HelpFormatter,
    )
    parser.add_argument("output_dir", help="new or empty folder to write the Space into")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    print(f"Space written to {export_space(args.output_dir)}")
    return 0
