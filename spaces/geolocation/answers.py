"""What the Space answers, independent of how the page draws it.

- `load_geolocators()` loads the models named by `GEOLOC_MODEL` (comma-separated Hub ids or local folders) as
  `geoloc.inference.adapter.Geolocator`s under display names that never show a server path (a folder is shown by its
  last component). Without it the Space runs the bundled toy model, or, where that is missing, a randomly
  initialised tiny GeoCLIP; the note it returns says which, for the page's banner.
- `locate()` asks one geolocator about one image or text (through the adapter only: places, and what the model
  declares in `Geolocator.capabilities`) and returns an `Answer`: the `GeolocationResult`, a plain-language
  phrase for each guess, the probability rolled up by country and, for the bundled examples, the true location
  and the error in km. A bad input raises `ValueError` with a message for the visitor.
- `Answer.to_json()` is what the API returns; `Answer.to_csv()` and `Answer.to_geojson()` are the downloads.

Example:
    >>> geolocators, note = load_geolocators("")  # bundled or random tiny model  # doctest: +SKIP
    >>> answer = locate(next(iter(geolocators.values())), text="a beach with palm trees", top_k=3)  # doctest: +SKIP
    >>> answer.countries[0]  # doctest: +SKIP
    ('Thailand', 0.41)
"""

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from geoloc import DEFAULT_MODEL
from geoloc.configs import byte_level_clip_tokenizer, tiny_geoclip_config, tiny_image_processor
from geoloc.geography.geodesy import geodesic_distance_km
from geoloc.geography.places import areas
from geoloc.inference.adapter import GeolocationResult, Geolocator
from geoloc.models import register_models
from geoloc.data.worldmap import sample_points
from geo_core import check_top_k
from modeling_geoclip import GeoCLIPModel

MODEL_ENV = "GEOLOC_MODEL"
BUNDLED_MODEL = DEFAULT_MODEL
BUNDLED_NAME = "geoclip-worldmap-tiny (bundled demo)"
RANDOM_NAME = "random tiny GeoCLIP"
RANDOM_GALLERY_SIZE = 4096
MAX_TOP_K = 20  # places listed at most
MAX_TEXT_CHARS = 300

NOTES = {
    "configured": "",
    "bundled": (
        "Demo model: trained only on crops of a Natural Earth map, it can place map crops like the examples, "
        "not photos or descriptions. Set GEOLOC_MODEL to a real checkpoint."
    ),
    "random": (
        "No model is configured (set GEOLOC_MODEL to Hub ids or folders) and the bundled demo model is not "
        "installed: this page runs a randomly initialised tiny GeoCLIP, so its answers are random."
    ),
}


# ------------------------------------------------------------------------------------------------ models
def model_note(name: str) -> str:
    """The caveat the page shows while model `name` is selected (empty for a configured model)."""
    return NOTES["bundled"] if name == BUNDLED_NAME else NOTES["random"] if name == RANDOM_NAME else ""


def display_name(source: str) -> str:
    """How the page and the API name a model: a Hub id as it is, a local folder by its last component (never a
    server path), the bundled model as `BUNDLED_NAME`."""
    if source == "default" or (os.path.isdir(source) and Path(source).resolve() == Path(BUNDLED_MODEL).resolve()):
        return BUNDLED_NAME
    if os.path.isdir(source):
        return Path(source).resolve().name
    return source


def random_tiny_geolocator() -> Geolocator:
    """A randomly initialised tiny GeoCLIP (seeded) with a random gallery: the last-resort default."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GeoCLIPModel(tiny_geoclip_config())
    model.set_gallery(sample_points(RANDOM_GALLERY_SIZE, np.random.default_rng(0)))
    return Geolocator(model, tiny_image_processor(), byte_level_clip_tokenizer(), name=RANDOM_NAME)


def load_geolocators(spec: str | None = None) -> tuple[dict[str, Geolocator], str]:
    """The models the Space offers by display name (the first one is the default), and the page's note.

    Args:
        spec: comma-separated Hub ids or local folders; defaults to the `GEOLOC_MODEL` environment variable.
            Empty: the bundled demo model if installed, else a random tiny GeoCLIP.
    """
    register_models()  # the Space's start: every model it may serve, whatever was imported before
    spec = os.environ.get(MODEL_ENV, "") if spec is None else spec
    sources = [source.strip() for source in spec.split(",") if source.strip()]
    if sources:
        geolocators, note = [Geolocator.from_pretrained(source) for source in sources], NOTES["configured"]
        names = [display_name(source) for source in sources]
    elif (Path(BUNDLED_MODEL) / "config.json").is_file():
        geolocators, note, names = [Geolocator.from_pretrained(BUNDLED_MODEL)], NOTES["bundled"], [BUNDLED_NAME]
    else:
        geolocators, note, names = [random_tiny_geolocator()], NOTES["random"], [RANDOM_NAME]
    offered = {}
    for name, geolocator in zip(names, geolocators):
        unique, copy = name, 1
        while unique in offered:  # two folders with the same last component
            copy += 1
            unique = f"{name} ({copy})"
        geolocator.name = unique  # the adapter's messages name the model: never by its server path
        offered[unique] = geolocator
    return offered, note


# ----------------------------------------------------------------------------------------------- answers
@dataclass(frozen=True)
class Truth:
    """Where a bundled example really is."""

    label: str
    latitude: float
    longitude: float


@dataclass
class Answer:
    """One query's answer with everything the page and the downloads show.

    Args:
        result: the adapter's answer (top-k, places, and scenes, attention, uncertainty as the model declares).
        model: the model's display name.
        query: what was asked, for people: "the Alps example", "your photo" or the text.
        phrases: a plain-language place for each guess, best first ("Zernez, Switzerland", "near Zernez,
            Switzerland", "Switzerland", "Adriatic Sea"): `geoloc.geography.places.describe_places`.
        countries: `(area, probability)` pairs, most probable first: the model's probability summed by the
            country, or the sea, each candidate lies in (`geoloc.geography.places.areas`).
        truth: the true location of a bundled example, else None.
        cells: for models whose candidates are geocells, the S2 token of each uncertainty point's cell.
    """

    result: GeolocationResult
    model: str
    query: str
    phrases: list[str]
    countries: list[tuple[str, float]]
    truth: Truth | None = None
    cells: list[str] | None = None
    water: frozenset[str] = frozenset()  # the names in `countries` that are seas or oceans

    @property
    def error_km(self) -> float | None:
        """Distance from the best guess to the true location (km), for bundled examples."""
        if self.truth is None:
            return None
        return float(geodesic_distance_km([self.truth.latitude], [self.truth.longitude],
                                          self.result.latitudes[:1], self.result.longitudes[:1])[0])

    def rows(self) -> list[dict]:
        """The top-k as dicts, best first: rank, latitude, longitude, probability, place (the nearest town),
        country (None at sea), area (the country or sea), km (to the town), phrase (the place in words)."""
        result = self.result
        return [
            {"rank": rank, "latitude": float(lat), "longitude": float(lon), "probability": float(p),
             "place": place["place"], "country": place["country"], "area": place["area"],
             "km": float(place["km"]), "phrase": phrase}
            for rank, (lat, lon, p, place, phrase) in enumerate(
                zip(result.latitudes, result.longitudes, result.probabilities, result.places, self.phrases),
                start=1)
        ]

    def to_json(self) -> dict:
        """What the API returns: `GeolocationResult.to_dict()` (predictions with places, uncertainty, scenes,
        attention weights as the model declares them) plus `model`, `query`, `countries` and, for bundled
        examples, `truth` and `error_km`."""
        answer = self.result.to_dict()
        answer.update(model=self.model, query=self.query,
                      countries=[{"country": c, "probability": p} for c, p in self.countries])
        for prediction, phrase in zip(answer["predictions"], self.phrases):
            prediction["phrase"] = phrase
        if self.truth is not None:
            answer["truth"] = {"label": self.truth.label, "latitude": self.truth.latitude,
                               "longitude": self.truth.longitude}
            answer["error_km"] = self.error_km
        return answer

    def to_csv(self) -> str:
        """The top-k as CSV: rank, latitude, longitude, probability, place (in words), area (country or sea),
        nearest_town, km_to_town."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["rank", "latitude", "longitude", "probability", "place", "area", "nearest_town",
                         "km_to_town"])
        for row in self.rows():
            writer.writerow([row["rank"], f"{row['latitude']:.6f}", f"{row['longitude']:.6f}",
                             f"{row['probability']:.6g}", row["phrase"], row["area"], row["place"],
                             f"{row['km']:.1f}"])
        return buffer.getvalue()

    def to_geojson(self) -> str:
        """The top-k (and the true location of an example) as a GeoJSON FeatureCollection of points."""
        features = [
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [row["longitude"], row["latitude"]]},
             "properties": {"rank": row["rank"], "probability": row["probability"], "place": row["phrase"],
                            "area": row["area"], "nearest_town": row["place"], "km_to_town": row["km"]}}
            for row in self.rows()
        ]
        if self.truth is not None:
            features.append({
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [self.truth.longitude, self.truth.latitude]},
                "properties": {"true_location": self.truth.label, "error_km": self.error_km},
            })
        return json.dumps({"type": "FeatureCollection", "model": self.model, "query": self.query,
                           "features": features}, indent=1)


def country_shares(result: GeolocationResult) -> tuple[list[tuple[str, float]], frozenset[str]]:
    """The model's probability summed by the country, or the sea, each candidate lies in, most probable first,
    and which of those names are water.

    Uses the uncertainty points (all the candidates the model declares, e.g. GeoCLIP's most probable gallery
    points or GeoHier's fine cells) when there are any, else the top-k.
    """
    if result.uncertainty is not None and len(result.uncertainty):
        latitudes, longitudes, probabilities = result.uncertainty.T
    else:
        latitudes, longitudes, probabilities = result.latitudes, result.longitudes, result.probabilities
    names, water = areas(latitudes, longitudes)
    shares: dict[str, float] = {}
    for name, p in zip(names, probabilities.tolist()):
        shares[name] = shares.get(name, 0.0) + p
    return sorted(shares.items(), key=lambda item: -item[1]), frozenset(np.asarray(names)[water].tolist())


def locate(geolocator: Geolocator, *, image=None, text: str | None = None, top_k: int, query: str | None = None,
           truth: Truth | None = None) -> Answer:
    """Geolocate one image (path, bytes, numpy array or PIL image) or one text with everything the page shows.

    Args:
        query: how the page names the input (default: "your photo", or the text).

    Raises:
        ValueError: for an unreadable image, empty or over-long text, text for a model that reads none, or
            `top_k` outside 1..MAX_TOP_K; the message is written for the visitor.
    """
    check_top_k(top_k, MAX_TOP_K)
    if text is not None:
        text = text.strip()
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"The text is too long ({len(text)} characters): keep it under {MAX_TEXT_CHARS}.")
        [result] = geolocator.locate_texts([text], top_k, places=True, extras=True)
        query = query or f"“{text}”"
    else:
        [result] = geolocator.locate_images([image], top_k, places=True, extras=True)
        query = query or "your photo"
    if result.error:
        raise ValueError(result.error)
    if not np.isfinite(result.probabilities).all():
        raise ValueError(f"The model {geolocator.name} returned no usable probabilities for this input.")
    phrases = [place["name"] for place in result.places]
    cells = result.uncertainty_ids if geolocator.capabilities.uncertainty == "cells" else None
    shares, water = country_shares(result)
    return Answer(result, geolocator.name, query, phrases, shares, truth, cells, water)


def format_percent(p: float) -> str:
    """A probability for people: "62%", "8.1%", "0.45%", "<0.1%"."""
    percent = 100 * p
    if percent >= 9.95:
        return f"{percent:.0f}%"
    if percent >= 0.995:
        return f"{percent:.1f}%"
    if percent >= 0.1:
        return f"{percent:.2f}%"
    return "<0.1%"


def format_coordinates(latitude: float, longitude: float) -> str:
    """ "46.50° N, 9.90° E" (two decimals: about a kilometre)."""
    return (f"{abs(latitude):.2f}° {'N' if latitude >= 0 else 'S'}, "
            f"{abs(longitude):.2f}° {'E' if longitude >= 0 else 'W'}")
