"""`geoloc evaluate`: score a GeoCLIP or GeoHier checkpoint on a benchmark or any geolocation dataset.

Evaluation is the dataset runner (`geoloc.inference.runner`, the one `geoloc predict --dataset` uses: chunked,
resumable, sharded over processes) plus the metric. It writes `DIR/predictions.csv` in the runner's schema (one
row per image and rank, with `true_latitude,true_longitude,error_km`; for a calibrated model also
`confidence_<r>km`, `unfamiliar`, `unfamiliarity`), `DIR/predictions.errors.csv` (`id,error`) when some images
could not be decoded (those are skipped and counted, never fatal), and `DIR/metrics.json` (`acc_1km` ...
`acc_2500km`, `mean_km`, `median_km`, `geoscore`; for a calibrated model also `ece_25km` ... `ece_2500km` and
`unfamiliar_rate`; plus `n`, `n_unreadable`, `model`, `dataset`, `top_k`, `ten_crop`), scored from the
predictions file. With `--top-k K > 1`, metrics.json also holds `best_of_top_k`: the same metrics for the
closest of the K candidates (an upper bound, as some papers report). A killed run resumes when rerun with the
same options; a finished one is replaced by the next run into the same folder.

Runs on one device, or over processes with `accelerate launch`: chunk c of `--chunk-size` rows is done by
process `c % N`, and the main process merges and scores. On GPUs use
`accelerate launch --multi_gpu --num_processes N -m geoloc.inference.evaluate ...`. On a CPU-only machine
`accelerate launch --cpu --num_processes N` starts a single process (accelerate expects MPI for multi-CPU);
start N CPU processes (gloo) with `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N`.

Example:
    geoloc evaluate --model ./geoclip --dataset im2gps3k --data-dir data/im2gps3k --output-dir eval/im2gps3k
    accelerate launch --multi_gpu --num_processes 4 -m geoloc.inference.evaluate --model ./geoclip --dataset osv5m \
        --output-dir eval/osv5m
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from ..cli import HelpFormatter, check_minimums
from ..data.benchmarks import BENCHMARKS, load_benchmark
from ..data.dataset import load_geo_dataset
from ..models import register_models
from ..sources import check_local_or_hub
from .adapter import Geolocator
from .calibration import expected_calibration_error
from .metrics import distance_metrics
from .predict import content_sha256
from .runner import (
    DECODE_WORKERS,
    ChunkParts,
    DatasetRun,
    confidence_column,
    confidence_radii,
    errors_path,
    read_predictions,
    run_dataset,
)

PREDICTIONS_FILE = "predictions.csv"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geoloc evaluate",
        description="Evaluate a geolocation checkpoint: writes metrics.json and predictions.csv.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", required=True,
                        help="checkpoint folder or Hub id (GeoCLIP or GeoHier); 'default' is the bundled toy model")
    parser.add_argument(
        "--dataset", required=True,
        help=f"a benchmark ({', '.join(sorted(BENCHMARKS))}) or a dataset path / Hub id read with "
             "geoloc.data.dataset.load_geo_dataset",
    )
    parser.add_argument("--output-dir", required=True, help="where metrics.json and predictions.csv go")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass and process")
    parser.add_argument("--top-k", type=int, default=1,
                        help="candidates per image; metrics use the best-ranked, best_of_top_k the closest")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N rows")
    parser.add_argument("--chunk-size", type=int, default=1024,
                        help="rows per resumable unit of work (at most this many are redone after a kill)")
    parser.add_argument("--decode-workers", type=int, default=DECODE_WORKERS,
                        help="threads that decode and process the next batches while the model runs (0: none)")
    parser.add_argument("--ten-crop", action="store_true",
                        help="GeoHier: answer each image from the average of its ten crops (the four corners and the "
                             "centre of the resized image and of its mirror image; GeoGuessNet's TenCrop evaluation)")
    parser.add_argument("--data-dir", default=None,
                        help="local copy of a benchmark in its original layout (see geoloc.data.benchmarks)")
    parser.add_argument("--split", help="split of a dataset path / Hub id (default: test; a local folder without "
                        "a test/ subfolder is one split, which `imagefolder` calls train)")
    parser.add_argument("--image-column", default="image", help="image column of a dataset path / Hub id")
    parser.add_argument("--lat-column", default="latitude", help="latitude column of a dataset path / Hub id")
    parser.add_argument("--lon-column", default="longitude", help="longitude column of a dataset path / Hub id")
    return parser


def load_evaluation_dataset(args: argparse.Namespace):
    """The benchmark named by `args.dataset`, or the dataset at that path / Hub id."""
    if args.dataset in BENCHMARKS:
        return load_benchmark(args.dataset, args.data_dir)
    if args.data_dir is not None:
        raise ValueError(
            f"--data-dir is for the benchmarks ({', '.join(sorted(BENCHMARKS))}); for a dataset path pass it "
            f"as --dataset (got --dataset {args.dataset!r})."
        )
    split = args.split
    if split is None:
        local_single_split = os.path.isdir(args.dataset) and not os.path.isdir(os.path.join(args.dataset, "test"))
        split = "train" if local_single_split else "test"
    return load_geo_dataset(
        args.dataset, split=split,
        image_column=args.image_column, lat_column=args.lat_column, lon_column=args.lon_column,
    )


def calibration_metrics(best, errors_km: np.ndarray) -> dict:
    """For a calibrated model (`geoloc calibrate`), from the rank-1 rows: `ece_<r>km` of its confidence at each
    radius (expected calibration error, 10 equal-width bins) and `unfamiliar_rate`, the share of images it
    flagged as unfamiliar."""
    metrics = {}
    for radius in confidence_radii(best.columns):
        metrics[f"ece_{radius:g}km"] = expected_calibration_error(best[confidence_column(radius)].to_numpy(float),
                                                                  errors_km <= radius)
    if "unfamiliar" in best:
        metrics["unfamiliar_rate"] = float(best["unfamiliar"].astype(bool).mean())
    return metrics


def score(predictions: Path, unreadable: int, model: str, dataset: str, top_k: int,
          ten_crop: bool = False) -> dict:
    """metrics.json's content from the runner's predictions file (rank-1 rows: the answers)."""
    frame = read_predictions(predictions)
    first = (frame["rank"] == 1).to_numpy()
    if not first.any():
        raise ValueError(f"No image of {dataset!r} could be read ({unreadable} rows): nothing to score.")
    best = frame[first]
    errors_km = best["error_km"].to_numpy(float)
    summary = {**distance_metrics(errors_km), "n": int(first.sum()), "n_unreadable": unreadable, "model": model,
               "dataset": dataset, "top_k": top_k, "ten_crop": ten_crop}
    summary.update(calibration_metrics(best, errors_km))
    if top_k > 1:
        image = np.cumsum(first)  # rows of one image follow each other, rank 1 first
        summary["best_of_top_k"] = distance_metrics(frame["error_km"].groupby(image).min().to_numpy(float))
    return summary


def main(argv=None) -> int:
    """Run `geoloc evaluate`; returns the exit status (0 ok, 2 bad arguments). A bad model or dataset raises;
    `geoloc` (the dispatcher) turns that into one line on stderr and exit 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_minimums(parser, args, batch_size=1, max_samples=1, chunk_size=1, decode_workers=0)
    return evaluate(args)


def evaluate(args: argparse.Namespace) -> int:
    """Predict the whole dataset with the runner (over the accelerate processes), then score it."""
    if args.model != "default":  # paths first: a mistyped one fails before the model is loaded
        check_local_or_hub(args.model, "--model")
    if args.dataset not in BENCHMARKS:
        check_local_or_hub(args.dataset, "--dataset", patterns=True)
    if args.data_dir is not None:
        check_local_or_hub(args.data_dir, "--data-dir", hub=False)
    register_models()
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    output_dir = Path(args.output_dir)
    predictions = output_dir / PREDICTIONS_FILE
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if not ChunkParts(predictions).folder.exists():  # no run to resume: this run replaces the last results
            for old in (predictions, errors_path(predictions), output_dir / "metrics.json"):
                old.unlink(missing_ok=True)
    state.wait_for_everyone()
    options = {"model_sha256": content_sha256(args.model), "dataset": args.dataset, "split": args.split,
               "max_samples": args.max_samples, "top_k": args.top_k, "ten_crop": args.ten_crop,
               "chunk_size": args.chunk_size, "columns": [args.image_column, args.lat_column, args.lon_column]}
    run = DatasetRun(predictions, options, args.top_k, args.batch_size, args.chunk_size, references=True,
                     ten_crop=args.ten_crop, decode_workers=args.decode_workers, root=args.dataset if os.path.isdir(args.dataset) else None,
                     command="geoloc evaluate", label=f"--output-dir {output_dir}")
    done = run_dataset(run, state, lambda: _evaluation_rows(args),
                       lambda device: Geolocator.from_pretrained(args.model, device=device))
    if state.is_main_process:
        summary = score(predictions, done[1] if done else 0, args.model, args.dataset, args.top_k, args.ten_crop)
        with open(output_dir / "metrics.json", "w") as handle:
            json.dump(summary, handle, indent=2)
        print(f"geoloc evaluate: {summary['n']} images scored, {summary['n_unreadable']} unreadable, "
              f"{state.num_processes} process(es) -> {args.output_dir}")
        print(json.dumps({key: value for key, value in summary.items() if key != "best_of_top_k"}, indent=2))
    state.wait_for_everyone()
    return 0


def _evaluation_rows(args: argparse.Namespace):
    dataset = load_evaluation_dataset(args)
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    return dataset


if __name__ == "__main__":
    from ..cli import run_command

    run_command("evaluate")
