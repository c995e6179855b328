"""CPU learnability benchmark: do the README's training commands teach the tiny models where world-map crops
come from, better than the strongest cheap lookups of the training crops?

For each split kind (`random`: held-out points drawn among the training points, so a held-out crop's window
usually overlaps training crops; `buffered`: no training crop's window overlaps a held-out crop's), it builds the
world-map crops (`geoloc worldmap`: Natural Earth shaded relief) with train / validation / test splits, trains the
tiny GeoCLIP and GeoHier with the README's command (`accelerate launch --multi_gpu --num_processes 2 -m geoloc.training.train
--model MODEL --dataset DIR --output-dir OUT --seed S`: the default recipes, nothing else) for several seeds,
scores the validation and test splits with `geoloc evaluate`, and prints one markdown table per split kind, the
models as mean ± standard deviation over the seeds, beside these baselines on the same crops:

- chance: always the (spherical) mean of the training coordinates; a random training coordinate;
- 1-NN lookups of the training crops (their answer is a training location, GeoCLIP's output space): raw pixels
  (L2 and cosine), 4x4-pooled pixels (cosine), and shift-tolerant (the held-out crop's centre 24x24 pixels
  against every 24x24 window of a training crop within +-4 px, 4x4-pooled, best cosine);
- the same lookups snapped to the nearest centroid of GeoHier's finest cells (GeoHier's output space: a classifier
  cannot beat its own cell resolution).

The validation split is for tuning choices; the test split is reported and never tuned on. The crops are drawn
with `--data-seed 1`: the tiny recipes' settings were chosen on held-out crops of seed 0, so neither split here
was seen by any choice.

    python benchmarks/bench_learnability.py [--train 2000 --validation 250 --test 250 --seeds 0 1 2]
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

from geoloc.geography.geodesy import KM_PER_DEGREE, unit_vectors, vector_directions
from geoloc.inference.metrics import geolocation_metrics
from geoloc.models import register_models
from geoloc.data.worldmap import build_worldmap_splits, write_imagefolder

THRESHOLDS_KM = (25, 200, 750, 2500)
HELD_OUT = ("validation", "test")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pixels(images) -> np.ndarray:
    """(N, H, W, 3) float32 pixels of PIL images."""
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])


def pooled(images: np.ndarray, factor: int = 4) -> np.ndarray:
    """(N, H, W, 3) -> (N, H/factor * W/factor * 3): mean over factor x factor blocks, flattened."""
    n, height, width, channels = images.shape
    blocks = images.reshape(n, height // factor, factor, width // factor, factor, channels)
    return blocks.mean(axis=(2, 4)).reshape(n, -1)


def nearest_neighbours(train: np.ndarray, query: np.ndarray, metric: str) -> np.ndarray:
    """Index of each query vector's nearest training vector, by L2 distance or cosine similarity."""
    if metric == "cosine":
        return (normalised(query) @ normalised(train).T).argmax(axis=1)
    return ((train**2).sum(1)[None] - 2 * query @ train.T).argmin(axis=1)


def normalised(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def shift_tolerant_neighbours(train: np.ndarray, query: np.ndarray, shift: int = 4, factor: int = 4) -> np.ndarray:
    """Index of the training crop one of whose windows, shifted by up to `shift` px, best matches (cosine) each
    query crop's centre: (H - 2 shift) px squares, `factor` x `factor`-pooled."""
    size = train.shape[1] - 2 * shift
    centre = normalised(pooled(query[:, shift:shift + size, shift:shift + size], factor))
    best = np.full((len(query), len(train)), -np.inf, dtype=np.float32)
    for dy in range(2 * shift + 1):
        for dx in range(2 * shift + 1):
            windows = normalised(pooled(train[:, dy:dy + size, dx:dx + size], factor))
            np.maximum(best, centre @ windows.T, out=best)
    return best.argmax(axis=1)


def snap(latitudes, longitudes, centroids: np.ndarray) -> np.ndarray:
    """Each point moved to its nearest centroid (great-circle), (N, 2) degrees."""
    points, centres = unit_vectors(latitudes, longitudes), unit_vectors(centroids[:, 0], centroids[:, 1])
    return centroids[(points @ centres.T).argmax(axis=1)]


def spherical_mean(latitudes, longitudes) -> tuple[float, float]:
    """Mean direction of points on the unit sphere, as (lat, lon) degrees."""
    lat, lon = vector_directions(unit_vectors(latitudes, longitudes).mean(axis=0, keepdims=True))
    return float(lat[0]), float(lon[0])


def baseline_answers(splits, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """{baseline name: {held-out split: (N, 2) answers}}: chance and the pixel lookups of the training crops."""
    train = splits["train"]
    train_points = np.stack([train["latitude"], train["longitude"]], axis=1)
    train_pixels = pixels(train["image"])
    mean = np.array(spherical_mean(train_points[:, 0], train_points[:, 1]))
    answers = {}
    for split in HELD_OUT:
        query = pixels(splits[split]["image"])
        picks = np.random.default_rng(seed).integers(0, len(train_points), len(query))
        lookups = {
            "chance: training mean": np.repeat(mean[None], len(query), axis=0),
            "chance: random training location": train_points[picks],
            "1-NN raw pixels (L2)": train_points[nearest_neighbours(
                train_pixels.reshape(len(train_pixels), -1), query.reshape(len(query), -1), "l2")],
            "1-NN raw pixels (cosine)": train_points[nearest_neighbours(
                train_pixels.reshape(len(train_pixels), -1), query.reshape(len(query), -1), "cosine")],
            "1-NN 4x4-pooled pixels (cosine)": train_points[nearest_neighbours(
                pooled(train_pixels), pooled(query), "cosine")],
            "1-NN shift-tolerant (centre 24 px, +-4 px, 4x4-pooled)": train_points[
                shift_tolerant_neighbours(train_pixels, query)],
        }
        for name, points in lookups.items():
            answers.setdefault(name, {})[split] = points
    return answers


def train_and_evaluate(model: str, data_dir: str, output_dir: str, processes: int, seed: int, train_args=()
                       ) -> tuple[dict[str, dict], float]:
    """Train with the README's command (`--seed seed`, `train_args` added) and score the held-out splits with
    `geoloc evaluate`: ({split: metrics}, training seconds)."""
    launcher = ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                 str(processes), "-m"] if processes > 1 else [sys.executable, "-m"])
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    load = os.getloadavg()[0]
    started = time.perf_counter()
    subprocess.run([*launcher, "geoloc.training.train", "--model", model, "--dataset", data_dir, "--output-dir", output_dir,
                    "--seed", str(seed), *train_args], cwd=REPO, env=env, check=True)
    seconds = time.perf_counter() - started
    print(f"[bench] {model} seed {seed}: trained in {seconds:.0f} s, CPU load {load:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores)", flush=True)
    metrics = {}
    for split in HELD_OUT:
        evaluation = os.path.join(output_dir, f"evaluation-{split}")
        subprocess.run([sys.executable, "-m", "geoloc.inference.evaluate", "--model", output_dir, "--dataset", data_dir,
                        "--split", split, "--output-dir", evaluation], cwd=REPO, env=env, check=True)
        with open(os.path.join(evaluation, "metrics.json")) as handle:
            metrics[split] = json.load(handle)
    return metrics, seconds


def run(train_size: int, validation_size: int, test_size: int, output_dir: str, *, buffered: bool = False,
        processes: int = 2, seeds=(0, 1, 2), models=("geoclip", "geohier"), data_seed: int = 1,
        train_args=()) -> list[dict]:
    """Build the crops, score the baselines, train the tiny `models` once per seed and return table rows:
    `{"name", "metrics": {split: [metrics per seed]}, "seconds": [per seed]}`, baselines first, then each model
    after the baselines snapped to its cells (GeoHier)."""
    register_models()  # GeoHier's cell table is read through the Auto classes

    splits = build_worldmap_splits(train_size, test_size, validation=validation_size, seed=data_seed,
                                   buffered=buffered)
    data_dir = os.path.join(output_dir, "data")
    write_imagefolder(splits, data_dir)
    truth = {split: (np.asarray(splits[split]["latitude"]), np.asarray(splits[split]["longitude"]))
             for split in HELD_OUT}
    train_vectors = unit_vectors(splits["train"]["latitude"], splits["train"]["longitude"])
    for split in HELD_OUT:
        nearest = np.degrees(np.arccos(np.clip((unit_vectors(*truth[split]) @ train_vectors.T).max(axis=1), -1, 1)))
        print(f"[bench] {'buffered' if buffered else 'random'} split: a {split} point lies "
              f"{np.median(nearest) * KM_PER_DEGREE:.0f} km from the nearest training point on median",
              flush=True)

    def scored(answers: dict[str, np.ndarray]) -> dict[str, list[dict]]:
        return {split: [geolocation_metrics(answers[split][:, 0], answers[split][:, 1], *truth[split])]
                for split in HELD_OUT}

    baselines = baseline_answers(splits, data_seed)
    rows = [{"name": name, "metrics": scored(answers), "seconds": [0.0]} for name, answers in baselines.items()]
    for model in models:
        results, seconds, recipe = {split: [] for split in HELD_OUT}, [], None
        for seed in seeds:
            model_dir = os.path.join(output_dir, f"{model}-seed{seed}")
            metrics, elapsed = train_and_evaluate(model, data_dir, model_dir, processes, seed, train_args)
            for split in HELD_OUT:
                results[split].append(metrics[split])
            seconds.append(elapsed)
            with open(os.path.join(model_dir, "train_summary.json")) as handle:
                recipe = json.load(handle)["recipe"]
        if model == "geohier":  # the lookups in GeoHier's output space: its finest cells (the same for every seed)
            table = AutoModel.from_pretrained(os.path.join(output_dir, f"{model}-seed{seeds[0]}")).get_cell_table()[-1]
            centroids = np.stack([table["latitudes"], table["longitudes"]], axis=1)
            for name, answers in baselines.items():
                if name.startswith("1-NN"):
                    snapped = {split: snap(answers[split][:, 0], answers[split][:, 1], centroids) for split in HELD_OUT}
                    rows.append({"name": f"{name} snapped to GeoHier's {len(centroids)} finest cells",
                                 "metrics": scored(snapped), "seconds": [0.0]})
        extra = f", {' '.join(train_args)}" if train_args else ""
        rows.append({"name": f"**tiny {model}** (`{recipe}`{extra}, {processes} process{'es' if processes > 1 else ''},"
                             f" {len(seeds)} seeds)", "metrics": results, "seconds": seconds, "model": model})
    return rows


def median_km(row: dict, split: str) -> float:
    """The row's median error on `split`, averaged over seeds."""
    return float(np.mean([metrics["median_km"] for metrics in row["metrics"][split]]))


def _cell(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(np.mean(values))} ± {fmt.format(np.std(values))}"


def markdown_table(rows) -> str:
    """Validation median, then test accuracies and median; models as mean ± standard deviation over seeds."""
    header = ("| method | validation median (km) | " + " | ".join(f"test acc@{t} km" for t in THRESHOLDS_KM)
              + " | test median (km) | train time (s) |")
    lines = [header, "|" + "---|" * (len(THRESHOLDS_KM) + 4)]
    for row in rows:
        validation, test = row["metrics"]["validation"], row["metrics"]["test"]
        accuracies = " | ".join(_cell([100 * m[f"acc_{t}km"] for m in test], "{:.1f}%") for t in THRESHOLDS_KM)
        lines.append(f"| {row['name']} | {_cell([m['median_km'] for m in validation], '{:.0f}')} | {accuracies} | "
                     f"{_cell([m['median_km'] for m in test], '{:.0f}')} | {_cell(row['seconds'], '{:.0f}')} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train", type=int, default=2000, help="training crops")
    parser.add_argument("--validation", type=int, default=250, help="validation crops (for tuning choices)")
    parser.add_argument("--test", type=int, default=250, help="test crops (reported, never tuned on)")
    parser.add_argument("--splits", nargs="+", default=["random", "buffered"], choices=["random", "buffered"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds")
    parser.add_argument("--data-seed", type=int, default=1,
                        help="seed of the crops (1: the tiny recipes were tuned on seed 0's held-out crops)")
    parser.add_argument("--processes", type=int, default=2, help="training processes (the README's command: 2)")
    parser.add_argument("--models", nargs="+", default=["geoclip", "geohier"], choices=["geoclip", "geohier"])
    parser.add_argument("--output-dir", help="keep data and models here (default: a temporary folder)")
    args = parser.parse_args(argv)
    for kind in args.splits:
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as scratch:
            output_dir = os.path.join(args.output_dir or scratch, kind)
            rows = run(args.train, args.validation, args.test, output_dir, buffered=kind == "buffered",
                       processes=args.processes, seeds=tuple(args.seeds), models=tuple(args.models),
                       data_seed=args.data_seed)
        print(f"\nWorld-map crops, {kind} split: {args.train} train / {args.validation} validation / {args.test} test "
              f"points, {os.cpu_count()} CPU cores, load {load:.1f} at the start, then {os.getloadavg()[0]:.1f}:\n")
        print(markdown_table(rows), flush=True)


if __name__ == "__main__":
    main()
