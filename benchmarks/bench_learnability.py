"""CPU learnability benchmark: can tiny GeoCLIP and tiny GeoHier learn where world-map crops come from?

Builds the world-map crops task (`geoloc.worldmap`, Natural Earth shaded relief, disjoint train/test points),
trains both tiny models with `geoloc.train` on the CPU for a few minutes, and prints a markdown table of
accuracy within 25/200/750/2500 km and median error on the test points, next to two chance baselines:
always predicting the (spherical) mean of the training coordinates, and a random training coordinate.
Metrics come from `geoloc.metrics.geolocation_metrics`.

    python benchmarks/bench_learnability.py [--train 2000 --test 500 --output-dir runs/learnability]
"""

import argparse
import os
import tempfile
import time
from contextlib import contextmanager

import numpy as np
import torch

from geoloc import train
from geoloc.inference import Geolocator
from geoloc.metrics import geolocation_metrics
from geoloc.worldmap import build_worldmap_splits, write_imagefolder

THRESHOLDS_KM = (25, 200, 750, 2500)


def top1_coordinates(model_dir: str, images, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 (latitudes, longitudes) of a trained checkpoint for a list of PIL images."""
    results = Geolocator.from_pretrained(model_dir).locate_images(images, top_k=1, batch_size=batch_size)
    return np.array([r.latitudes[0] for r in results]), np.array([r.longitudes[0] for r in results])


@contextmanager
def single_thread():
    """Run torch ops on one thread inside the block. The tiny models' ops are far too small to gain from
    intra-op threads, and on a busy machine the threads wait on each other: a tiny GeoHier step took
    ~2 s with 2 threads on 2 shared cores and ~0.05 s with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def spherical_mean(latitudes, longitudes) -> tuple[float, float]:
    """Mean direction of points on the unit sphere, as (lat, lon) degrees."""
    lat, lon = np.radians(latitudes), np.radians(longitudes)
    x, y, z = (np.cos(lat) * np.cos(lon)).mean(), (np.cos(lat) * np.sin(lon)).mean(), np.sin(lat).mean()
    return float(np.degrees(np.arctan2(z, np.hypot(x, y)))), float(np.degrees(np.arctan2(y, x)))


def run(train_size: int, test_size: int, output_dir: str, geoclip_steps: int, geohier_steps: int,
        seed: int = 0, models=("geoclip", "geohier"), geocell_levels: str = "10:100,10:40,5:20"
        ) -> list[tuple[str, dict, float]]:
    """Train the tiny `models` on world-map crops; return (name, metrics, train seconds) rows, the two
    chance baselines first. `geocell_levels` (GeoHier's tau_min:tau_max per level) must suit `train_size`:
    the default gives 50 / 86 / 126 cells for 2000 points."""
    splits = build_worldmap_splits(train_size, test_size, seed=seed)
    data_dir = os.path.join(output_dir, "data")
    write_imagefolder(splits, data_dir)
    test = splits["test"]
    ref_lat, ref_lon = np.asarray(test["latitude"]), np.asarray(test["longitude"])
    train_lat, train_lon = np.asarray(splits["train"]["latitude"]), np.asarray(splits["train"]["longitude"])
    rows = []
    mean_lat, mean_lon = spherical_mean(train_lat, train_lon)
    rows.append(("chance: train mean", geolocation_metrics(np.full_like(ref_lat, mean_lat),
                                                           np.full_like(ref_lon, mean_lon), ref_lat, ref_lon), 0.0))
    picks = np.random.default_rng(seed).integers(0, len(train_lat), len(ref_lat))
    rows.append(("chance: random gallery point",
                 geolocation_metrics(train_lat[picks], train_lon[picks], ref_lat, ref_lon), 0.0))
    common = ["--model-config", "tiny", "--dataset", data_dir, "--seed", str(seed), "--log-every", "50",
              "--checkpoint-every", "100000", "--learning-rate", "2e-3"]
    runs = [
        ("tiny GeoCLIP", "geoclip", geoclip_steps, ["--batch-size", "128", "--warmup-steps", "50", "--cache-features",
                                                   "--cache-dir", os.path.join(output_dir, "features")]),
        ("tiny GeoHier", "geohier", geohier_steps, ["--batch-size", "64", "--warmup-steps", "50",
                                                   "--geocell-levels", geocell_levels]),
    ]
    images = list(test["image"])
    for name, model, steps, extra in (run for run in runs if run[1] in models):
        model_dir = os.path.join(output_dir, model)
        with single_thread():
            started = time.perf_counter()
            train.main(["--model", model, "--output-dir", model_dir, "--max-steps", str(steps), *common, *extra])
            seconds = time.perf_counter() - started
            pred_lat, pred_lon = top1_coordinates(model_dir, images)
        rows.append((f"{name} ({steps} steps)", geolocation_metrics(pred_lat, pred_lon, ref_lat, ref_lon), seconds))
    return rows


def markdown_table(rows) -> str:
    header = "| method | " + " | ".join(f"acc@{t} km" for t in THRESHOLDS_KM) + " | median error (km) | train time (s) |"
    lines = [header, "|" + "---|" * (len(THRESHOLDS_KM) + 3)]
    for name, metrics, seconds in rows:
        accuracies = " | ".join(f"{100 * metrics[f'acc_{t}km']:.1f}%" for t in THRESHOLDS_KM)
        lines.append(f"| {name} | {accuracies} | {metrics['median_km']:.0f} | {seconds:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--geoclip-steps", type=int, default=500)
    parser.add_argument("--geohier-steps", type=int, default=800)
    parser.add_argument("--geocell-levels", default="10:100,10:40,5:20",
                        help="GeoHier's tau_min:tau_max per level (suited to --train 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", help="keep data and models here (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        rows = run(args.train, args.test, args.output_dir or scratch, args.geoclip_steps, args.geohier_steps,
                   args.seed, geocell_levels=args.geocell_levels)
    print(f"\nWorld-map crops, {args.train} train / {args.test} test points, CPU:\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
