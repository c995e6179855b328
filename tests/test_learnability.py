"""Learnability at CI size: each tiny model, trained by `geoloc train` (the CLI, in a fresh process) on world-map
crops, beats plain pixel 1-nearest-neighbour on the median error of a validation split by at least 10 %.

The baseline is not weakened: it is the better of L2 and cosine 1-NN on the raw pixels of the very crops the model
trains on (the pixels it sees, before its processor's normalisation), answering the neighbour's location; for
GeoHier the answer is snapped to the centroid of its finest cells (its own output space: a classifier cannot
answer finer than its cells). Both runs start together, one torch thread each, so on a quiet 2-core machine the
file takes about as long as the slower run. Margins and CPU times measured for this configuration (3 training seeds)
are in README, Results. This is a CI-sized check, far smaller than `benchmarks/bench_learnability.py`
(2,000 crops, the recipes' full length, stronger lookups): at this size plain 1-NN itself is weak (few training
crops), so passing shows the training path learns, not that the model beats the strongest lookups.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from geoloc import evaluate
from geoloc.geodesy import unit_vectors
from geoloc.metrics import geolocation_metrics
from geoloc.worldmap import build_worldmap_splits, write_imagefolder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CROPS, VALIDATION_CROPS, DATA_SEED = 1000, 200, 2
MARGIN = 0.9  # the model's validation median must be at most 90 % of the baseline's
# Recipe overrides for a CI-sized run (everything else is the default recipe, geoclip-tiny / geohier-tiny).
# Both keep the tiny random tower frozen (`--no-train-backbone`): at this size the recipes' end-to-end training of
# the tower does not get there (GeoCLIP 300 x 64 steps: chance; GeoHier 300 x 64 or 600 x 32 steps: 1.35-1.40x the
# snapped 1-NN's median), while the heads learn fast on the random tower's features. GeoCLIP computes those once
# (`--cache-features`), so its steps decode no image; the image MLP, the location encoder and the temperature
# train. GeoHier's decoder and classifiers train on the frozen tower's tokens.
TRAIN_ARGS = {
    "geoclip": ["--max-steps", "2000", "--batch-size", "64", "--learning-rate", "3e-3", "--warmup-steps", "20",
                "--augmentation", "none", "--queue-size", "256", "--no-train-backbone", "--cache-features"],
    "geohier": ["--max-steps", "600", "--batch-size", "32", "--learning-rate", "5e-3", "--warmup-steps", "20",
                "--augmentation", "none", "--no-train-backbone"],
}


def pixels(folder: str) -> np.ndarray:
    """(N, H*W*3) float32 raw pixels of a split folder's images, in metadata.csv order."""
    with open(os.path.join(folder, "metadata.csv")) as handle:
        names = [line.split(",")[0] for line in handle.read().splitlines()[1:]]
    return np.stack([np.asarray(Image.open(os.path.join(folder, name)).convert("RGB"), dtype=np.float32).reshape(-1)
                     for name in names])


def nearest(train: np.ndarray, query: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        train = train / np.linalg.norm(train, axis=1, keepdims=True)
        query = query / np.linalg.norm(query, axis=1, keepdims=True)
        return (query @ train.T).argmax(axis=1)
    return ((train**2).sum(1)[None] - 2 * query @ train.T).argmin(axis=1)


def snap(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each (lat, lon) point moved to its nearest centroid (great circle)."""
    similarity = unit_vectors(points[:, 0], points[:, 1]) @ unit_vectors(centroids[:, 0], centroids[:, 1]).T
    return centroids[similarity.argmax(axis=1)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`({model: validation median km}, {model: plain 1-NN median km in its output space}, seconds)`."""
    work = tmp_path_factory.mktemp("learnability")
    data = str(work / "data")
    splits = build_worldmap_splits(TRAIN_CROPS, 0, validation=VALIDATION_CROPS, seed=DATA_SEED)
    write_imagefolder(splits, data)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(work / "datasets-cache"),
                   "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    started, load = time.perf_counter(), os.getloadavg()[0]
    runs = {model: subprocess.Popen(
        [sys.executable, "-m", "geoloc", "train", "--model", model, "--dataset", data, "--output-dir",
         str(work / model), "--seed", "0", "--threads", "1", "--cache-dir", str(work / "features"),
         *TRAIN_ARGS[model]], cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for model in TRAIN_ARGS}
    for model, run in runs.items():
        output = run.communicate(timeout=900)[0]
        assert run.returncode == 0, f"geoloc train --model {model}:\n{output[-3000:]}"
    seconds = time.perf_counter() - started

    train_pixels, query_pixels = pixels(os.path.join(data, "train")), pixels(os.path.join(data, "validation"))
    train_points = np.stack([splits["train"]["latitude"], splits["train"]["longitude"]], axis=1)
    truth = np.stack([splits["validation"]["latitude"], splits["validation"]["longitude"]], axis=1)
    lookups = [train_points[nearest(train_pixels, query_pixels, metric)] for metric in ("l2", "cosine")]

    def median(points):
        return geolocation_metrics(points[:, 0], points[:, 1], truth[:, 0], truth[:, 1])["median_km"]

    models, baselines = {}, {}
    for model in TRAIN_ARGS:
        folder = str(work / model)
        assert evaluate.main(["--model", folder, "--dataset", data, "--split", "validation",
                              "--output-dir", str(work / f"{model}-eval")]) == 0
        with open(work / f"{model}-eval" / "metrics.json") as handle:
            models[model] = json.load(handle)["median_km"]
        answers = lookups
        if model == "geohier":
            from transformers import AutoModel

            from geoloc.models import register_models

            register_models()
            cells = AutoModel.from_pretrained(folder).get_cell_table()[-1]
            centroids = np.stack([cells["latitudes"], cells["longitudes"]], axis=1)
            answers = [snap(points, centroids) for points in lookups]
        baselines[model] = min(median(points) for points in answers)
    print(f"\nlearnability: {TRAIN_CROPS} crops, trained in {seconds:.0f} s (load {load:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} cores); validation medians "
          + ", ".join(f"{m} {models[m]:.0f} km vs plain 1-NN {baselines[m]:.0f} km ({models[m] / baselines[m]:.2f})"
                      for m in TRAIN_ARGS))
    return models, baselines, seconds


# Measured with this file's configuration and training seeds 0 / 1 / 2 (validation median over plain 1-NN):
# GeoCLIP 0.81 / 0.89 / 1.57, GeoHier 0.87 / 0.97 / 0.99. Seed 0 passes for both, the other seeds do not (GeoCLIP's
# seed 2 by far; the seed also draws the frozen random tower), so a pass here would rest on one lucky draw: not
# reliable at CI size, and not run until a configuration passes over seeds.
NOT_RELIABLE = ("not reliable at CI size: validation median over plain 1-NN is 0.81 / 0.89 / 1.57 (GeoCLIP) and "
                "0.87 / 0.97 / 0.99 (GeoHier) over training seeds 0 / 1 / 2 (README, Results)")


@pytest.mark.skip(reason=NOT_RELIABLE)
@pytest.mark.parametrize("model", sorted(TRAIN_ARGS))
def test_beats_plain_pixel_nearest_neighbour_on_validation(trained, model):
    models, baselines, _ = trained
    assert models[model] <= MARGIN * baselines[model], (
        f"{model}: validation median {models[model]:.0f} km, plain pixel 1-NN {baselines[model]:.0f} km "
        f"(needs <= {MARGIN:.0%} of it)")
