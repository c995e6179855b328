"""Each tiny model trained by `geoloc train` beats the plain pixel lookup of its own training crops on a
validation split of fresh crops, by at least 10 % on median error, in its own output space.

The models are trained once, not in CI (the commands in their READMEs: 4 to 20 minutes on 2 CPU processes, too
long for `.ci/run`); this test regenerates their exact training crops (`build_worldmap_splits` is deterministic:
the README's `geoloc worldmap ... --seed 1`) and three validation splits of fresh crops drawn with other seeds
(the recipes were tuned on other data; no test split is touched), and scores everything here. The baseline is
the better of L2 and cosine 1-nearest-neighbour on raw pixels (for GeoHier snapped to its finest cells); the
stronger shift-tolerant lookup is in `benchmarks/bench_learnability.py` and the README, beside the models.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

from geoloc import DEFAULT_MODEL, Geolocator
from geoloc.data.worldmap import build_worldmap_splits
from geoloc.inference.metrics import geolocation_metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_learnability import nearest_neighbours, pixels, snap  # noqa: E402  (the benchmark's baselines)

# The training crops of both models: `geoloc worldmap --train 4000 --test 500 --seed 1`.
TRAINING = dict(train=4000, test=500, seed=1)
VALIDATION_SEEDS = (31, 32, 33)
VALIDATION_SIZE = 300
MARGIN = 0.9  # the model's median error at most 90 % of the lookup's
MODELS = {
    "geoclip": DEFAULT_MODEL,
    "geohier": str(Path(__file__).resolve().parent / "data" / "geohier-worldmap-tiny"),
}


@pytest.fixture(scope="module")
def training_crops():
    train = build_worldmap_splits(TRAINING["train"], TRAINING["test"], seed=TRAINING["seed"])["train"]
    return np.stack([train["latitude"], train["longitude"]], axis=1), pixels(train["image"])


def median_km(answers: np.ndarray, truth: tuple) -> float:
    return geolocation_metrics(answers[:, 0], answers[:, 1], *truth)["median_km"]


@pytest.mark.parametrize("model", MODELS)
def test_the_trained_model_beats_the_plain_pixel_lookup_of_its_training_crops(training_crops, model):
    geolocator = Geolocator.from_pretrained(MODELS[model])
    answer_points = None
    if model == "geohier":  # its output space: the answer points of its finest cells
        table = geolocator.model.get_cell_table()[-1]
        answer_points = np.stack([table["latitudes"], table["longitudes"]], axis=1)
    train_points, train_pixels = training_crops
    train_vectors = train_pixels.reshape(len(train_pixels), -1)
    for seed in VALIDATION_SEEDS:
        validation = build_worldmap_splits(10, 10, validation=VALIDATION_SIZE, seed=seed)["validation"]
        truth = (np.asarray(validation["latitude"]), np.asarray(validation["longitude"]))
        query = pixels(validation["image"]).reshape(len(validation["image"]), -1)
        lookups = []
        for metric in ("l2", "cosine"):
            answers = train_points[nearest_neighbours(train_vectors, query, metric)]
            if answer_points is not None:
                answers = snap(answers[:, 0], answers[:, 1], answer_points)
            lookups.append(median_km(answers, truth))
        results = geolocator.locate_images(list(validation["image"]), top_k=1)
        ours = median_km(np.array([[result.latitudes[0], result.longitudes[0]] for result in results]), truth)
        assert ours <= MARGIN * min(lookups), (model, seed, ours, lookups)
