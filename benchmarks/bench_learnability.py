"""CPU learnability benchmark: do the README's training commands teach the tiny models where world-map crops
come from, better than trivial baselines?

Builds the world-map crops task (`geoloc worldmap`: Natural Earth shaded relief, disjoint train/test points),
trains tiny GeoCLIP and tiny GeoHier with the README's command (`accelerate launch --multi_gpu --num_processes 2
-m geoloc.train --model MODEL --dataset DIR --output-dir OUT`: the default recipes, nothing else), scores the
held-out crops with `geoloc evaluate`, and prints a markdown table beside these baselines on the same crops:

- chance: always the (spherical) mean of the training coordinates; a random training coordinate;
- 1-NN on raw pixels: the location of the training crop nearest in pixel space (L2, the usual definition; and
  cosine, a stronger variant that ignores brightness), i.e. the best a lookup of the training crops can do in
  GeoCLIP's output space (its gallery is the training coordinates);
- 1-NN on raw pixels snapped to the nearest centroid of GeoHier's finest cells, the same lookup in GeoHier's
  output space (a classifier cannot beat its own cell resolution).

    python benchmarks/bench_learnability.py [--train 2000 --test 500 --processes 2 --output-dir runs/learnability]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from transformers import AutoModel

from geoloc.models import register_models
from geoloc.geodesy import unit_vectors, vector_directions
from geoloc.metrics import geolocation_metrics
from geoloc.worldmap import build_worldmap_splits, write_imagefolder

register_models()  # the Auto classes below read GeoCLIP and GeoHier checkpoints

THRESHOLDS_KM = (25, 200, 750, 2500)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pixels(images) -> np.ndarray:
    """(N, H*W*3) float32 raw pixel vectors of PIL images."""
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.float32).ravel() for image in images])


def nearest_neighbours(train: np.ndarray, test: np.ndarray, metric: str) -> np.ndarray:
    """Index of each test vector's nearest training vector, by L2 distance or cosine similarity."""
    if metric == "cosine":
        train = train / np.linalg.norm(train, axis=1, keepdims=True)
        test = test / np.linalg.norm(test, axis=1, keepdims=True)
        return (test @ train.T).argmax(axis=1)
    return ((train**2).sum(1)[None] - 2 * test @ train.T).argmin(axis=1)


def snap(latitudes, longitudes, centroids: np.ndarray) -> np.ndarray:
    """Each point moved to its nearest centroid (great-circle), (N, 2) degrees."""
    points, centres = unit_vectors(latitudes, longitudes), unit_vectors(centroids[:, 0], centroids[:, 1])
    return centroids[(points @ centres.T).argmax(axis=1)]


def spherical_mean(latitudes, longitudes) -> tuple[float, float]:
    """Mean direction of points on the unit sphere, as (lat, lon) degrees."""
    lat, lon = vector_directions(unit_vectors(latitudes, longitudes).mean(axis=0, keepdims=True))
    return float(lat[0]), float(lon[0])


def train_command(model: str, data_dir: str, output_dir: str, processes: int, train_args=()) -> list[str]:
    """The README's training command for `model`, with `processes` CPU processes (and `train_args` added)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "-m"] if processes > 1 else [sys.executable, "-m"]
    return [*launcher, "geoloc.train", "--model", model, "--dataset", data_dir, "--output-dir", output_dir,
            *train_args]


def train_and_evaluate(model: str, data_dir: str, output_dir: str, processes: int, train_args=()
                       ) -> tuple[dict, float, str]:
    """Train with the README's command and score the test split with `geoloc evaluate`: (metrics, seconds,
    recipe)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run(train_command(model, data_dir, output_dir, processes, train_args), cwd=REPO, env=env, check=True)
    seconds = time.perf_counter() - started
    evaluation = os.path.join(output_dir, "evaluation")
    subprocess.run([sys.executable, "-m", "geoloc.evaluate", "--model", output_dir, "--dataset", data_dir,
                    "--split", "test", "--output-dir", evaluation], cwd=REPO, env=env, check=True)
    with open(os.path.join(evaluation, "metrics.json")) as handle:
        metrics = json.load(handle)
    with open(os.path.join(output_dir, "train_summary.json")) as handle:
        recipe = json.load(handle)["recipe"]
    return metrics, seconds, recipe


def run(train_size: int, test_size: int, output_dir: str, processes: int = 2, seed: int = 0,
        models=("geoclip", "geohier"), train_args=()) -> list[tuple[str, dict, float]]:
    """Build the crops, train the tiny `models` (`train_args`: options added to the README's command, e.g. a
    shorter `--max-steps` for tests), and return `(name, metrics, train seconds)` rows: the baselines first, then
    each model after its own snapped baseline."""
    splits = build_worldmap_splits(train_size, test_size, seed=seed)
    data_dir = os.path.join(output_dir, "data")
    write_imagefolder(splits, data_dir)
    train, test = splits["train"], splits["test"]
    train_lat, train_lon = np.asarray(train["latitude"]), np.asarray(train["longitude"])
    ref_lat, ref_lon = np.asarray(test["latitude"]), np.asarray(test["longitude"])

    def score(lat, lon):
        return geolocation_metrics(np.asarray(lat), np.asarray(lon), ref_lat, ref_lon)

    mean_lat, mean_lon = spherical_mean(train_lat, train_lon)
    picks = np.random.default_rng(seed).integers(0, len(train_lat), len(ref_lat))
    train_pixels, test_pixels = pixels(train["image"]), pixels(test["image"])
    nearest = {metric: nearest_neighbours(train_pixels, test_pixels, metric) for metric in ("l2", "cosine")}
    rows = [
        ("chance: training mean", score(np.full_like(ref_lat, mean_lat), np.full_like(ref_lon, mean_lon)), 0.0),
        ("chance: random training location", score(train_lat[picks], train_lon[picks]), 0.0),
        ("1-NN raw pixels (L2)", score(train_lat[nearest["l2"]], train_lon[nearest["l2"]]), 0.0),
        ("1-NN raw pixels (cosine)", score(train_lat[nearest["cosine"]], train_lon[nearest["cosine"]]), 0.0),
    ]
    for model in models:
        model_dir = os.path.join(output_dir, model)
        metrics, seconds, recipe = train_and_evaluate(model, data_dir, model_dir, processes, train_args)
        if model == "geohier":
            table = AutoModel.from_pretrained(model_dir).get_cell_table()[-1]
            centroids = np.stack([table["latitudes"], table["longitudes"]], axis=1)
            for metric, name in (("l2", "L2"), ("cosine", "cosine")):
                snapped = snap(train_lat[nearest[metric]], train_lon[nearest[metric]], centroids)
                rows.append((f"1-NN raw pixels ({name}) snapped to GeoHier's {len(centroids)} finest cells",
                             score(snapped[:, 0], snapped[:, 1]), 0.0))
        steps = f", {' '.join(train_args)}" if train_args else ""
        rows.append((f"tiny {model} (`{recipe}`{steps}, {processes} process{'es' if processes > 1 else ''})",
                     metrics, seconds))
    return rows


def markdown_table(rows) -> str:
    header = "| method | " + " | ".join(f"acc@{t} km" for t in THRESHOLDS_KM) + " | median error (km) | train time (s) |"
    lines = [header, "|" + "---|" * (len(THRESHOLDS_KM) + 3)]
    for name, metrics, seconds in rows:
        accuracies = " | ".join(f"{100 * metrics[f'acc_{t}km']:.1f}%" for t in THRESHOLDS_KM)
        lines.append(f"| {name} | {accuracies} | {metrics['median_km']:.0f} | {seconds:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train", type=int, default=2000, help="training crops")
    parser.add_argument("--test", type=int, default=500, help="held-out crops")
    parser.add_argument("--processes", type=int, default=2, help="training processes (the README's command: 2)")
    parser.add_argument("--models", nargs="+", default=["geoclip", "geohier"], choices=["geoclip", "geohier"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", help="keep data and models here (default: a temporary folder)")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        rows = run(args.train, args.test, args.output_dir or scratch, args.processes, args.seed, args.models)
    print(f"\nWorld-map crops, {args.train} train / {args.test} test points, {os.cpu_count()} CPU cores, load "
          f"{load:.1f} at the start:\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
