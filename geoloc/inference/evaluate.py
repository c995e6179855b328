"""`geoloc evaluate`: score a GeoCLIP or GeoHier checkpoint on a benchmark or any geolocation dataset.

Writes `DIR/metrics.json` (`acc_1km` ... `acc_2500km`, `mean_km`, `median_km`, `geoscore`; for a model
calibrated with `geoloc calibrate` also `ece_25km` ... `ece_2500km` and `unfamiliar_rate`; plus `n`,
`n_unreadable`, `model`, `dataset`, `top_k`, `ten_crop`) and `DIR/predictions.csv`
(`id,latitude,longitude,pred_latitude,pred_longitude,error_km`, the model's best guess per image), and
`DIR/unreadable.csv` (`id,error`) when some images could not be decoded: those are skipped and counted,
never fatal. With `--top-k K > 1`, metrics.json also holds `best_of_top_k`: the same metrics for the
closest of the K candidates (an upper bound, as some papers report).

Runs on one device, or sharded over processes with `accelerate launch`: each process predicts a
contiguous shard and the main process gathers them, in dataset order. On GPUs use
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
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..data.benchmarks import BENCHMARKS, load_benchmark
from ..cli import HelpFormatter
from ..data.dataset import load_geo_dataset
from ..geography.geodesy import geodesic_distance_km
from .adapter import Geolocator
from .calibration import expected_calibration_error
from .metrics import distance_metrics
from ..models import register_models
from ..sources import check_local_or_hub
from .predict import row_ids


PREDICTION_COLUMNS = ["id", "latitude", "longitude", "pred_latitude", "pred_longitude", "error_km"]


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


@dataclass
class ShardPredictions:
    """What one process predicted: kept rows' ids, true and (B, K) predicted coordinates; skipped rows."""

    ids: list = field(default_factory=list)
    latitudes: list = field(default_factory=list)
    longitudes: list = field(default_factory=list)
    pred_latitudes: list = field(default_factory=list)
    pred_longitudes: list = field(default_factory=list)
    unreadable: list = field(default_factory=list)
    confidences: list = field(default_factory=list)  # per kept row: {radius_km: calibrated confidence} or None
    unfamiliar: list = field(default_factory=list)  # per kept row: bool or None


def locate_shard(geolocator: Geolocator, dataset, batch_size: int, top_k: int, offset: int = 0,
                 show_progress: bool = True, ten_crop: bool = False) -> ShardPredictions:
    """Geolocate every row of `dataset` with `geolocator.locate_images`; unreadable images are skipped and
    recorded as `(id, error)` in `unreadable`.

    Args:
        dataset: rows with `image` (anything `geoloc.data.dataset.decode_image` reads), `latitude`, `longitude`.
        offset: the row number of the first row in the full dataset (for ids of rows without one).
        ten_crop: answer each image from its ten crops (GeoHier).
    """
    shard = ShardPredictions()
    progress = tqdm(total=len(dataset), desc="Evaluating", unit="img", disable=not show_progress)
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        results = geolocator.locate_images(rows["image"], top_k, names=row_ids(rows, offset + start),
                                           batch_size=batch_size, ten_crop=ten_crop)
        for result, latitude, longitude in zip(results, rows["latitude"], rows["longitude"]):
            if result.error:
                shard.unreadable.append((result.input, result.error))
                continue
            shard.ids.append(result.input)
            shard.latitudes.append(latitude)
            shard.longitudes.append(longitude)
            shard.pred_latitudes.append(result.latitudes)
            shard.pred_longitudes.append(result.longitudes)
            shard.confidences.append(result.confidence)
            shard.unfamiliar.append(result.unfamiliar)
        progress.update(len(results))
    progress.close()
    return shard


def _gather(shard: ShardPredictions) -> ShardPredictions:
    """Concatenate every process's predictions on all processes, in process (= dataset) order."""
    gathered = gather_object([shard])
    return ShardPredictions(**{
        name: [item for part in gathered for item in getattr(part, name)] for name in vars(shard)
    })


def calibration_metrics(predictions: ShardPredictions, errors_km: np.ndarray) -> dict:
    """For a calibrated model (`geoloc calibrate`): `ece_<r>km` of its confidence at each radius (expected
    calibration error, 10 equal-width bins) and `unfamiliar_rate`, the share of images it flagged as unfamiliar."""
    metrics = {}
    if predictions.confidences and all(c is not None for c in predictions.confidences):
        for radius in predictions.confidences[0]:
            confidences = [c[radius] for c in predictions.confidences]
            metrics[f"ece_{radius:g}km"] = expected_calibration_error(confidences, errors_km <= radius)
    if predictions.unfamiliar and all(u is not None for u in predictions.unfamiliar):
        metrics["unfamiliar_rate"] = float(np.mean(predictions.unfamiliar))
    return metrics


def write_results(predictions: ShardPredictions, output_dir: str, model: str, dataset: str, top_k: int,
                  ten_crop: bool = False) -> dict:
    """Score the gathered predictions and write metrics.json, predictions.csv (and unreadable.csv)."""
    total = len(predictions.ids) + len(predictions.unreadable)
    if not predictions.ids:
        raise ValueError(f"No image of {dataset!r} could be read ({total} rows): nothing to score.")
    latitudes, longitudes = np.asarray(predictions.latitudes), np.asarray(predictions.longitudes)
    candidates_lat, candidates_lon = np.stack(predictions.pred_latitudes), np.stack(predictions.pred_longitudes)
    candidate_errors = geodesic_distance_km(
        candidates_lat.ravel(), candidates_lon.ravel(),
        np.repeat(latitudes, top_k), np.repeat(longitudes, top_k),
        names=("predictions", "references"),
    ).reshape(-1, top_k)
    metrics = distance_metrics(candidate_errors[:, 0])
    summary = {**metrics, "n": len(predictions.ids), "n_unreadable": len(predictions.unreadable),
               "model": model, "dataset": dataset, "top_k": top_k, "ten_crop": ten_crop}
    summary.update(calibration_metrics(predictions, candidate_errors[:, 0]))
    if top_k > 1:
        summary["best_of_top_k"] = distance_metrics(candidate_errors.min(axis=1))
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "metrics.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    pd.DataFrame({
        "id": predictions.ids, "latitude": latitudes, "longitude": longitudes,
        "pred_latitude": candidates_lat[:, 0], "pred_longitude": candidates_lon[:, 0],
        "error_km": candidate_errors[:, 0],
    }, columns=PREDICTION_COLUMNS).to_csv(os.path.join(output_dir, "predictions.csv"), index=False)
    if predictions.unreadable:
        pd.DataFrame(predictions.unreadable, columns=["id", "error"]).to_csv(
            os.path.join(output_dir, "unreadable.csv"), index=False
        )
    return summary


def main(argv=None) -> int:
    """Run `geoloc evaluate`; returns the exit status (0 ok, 2 bad arguments). A bad model or dataset raises;
    `geoloc` (the dispatcher) turns that into one line on stderr and exit 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_samples is not None and args.max_samples < 1:
        parser.error(f"--max-samples must be >= 1, got {args.max_samples}")
    return evaluate(args)


def evaluate(args: argparse.Namespace) -> int:
    """Predict the whole dataset (sharded over the accelerate processes) and write the results."""
    if args.model != "default":  # paths first: a mistyped one fails before the model is loaded
        check_local_or_hub(args.model, "--model")
    if args.dataset not in BENCHMARKS:
        check_local_or_hub(args.dataset, "--dataset", patterns=True)
    if args.data_dir is not None:
        check_local_or_hub(args.data_dir, "--data-dir", hub=False)
    register_models()
    accelerator = Accelerator()
    geolocator = Geolocator.from_pretrained(args.model, device=accelerator.device)
    dataset = load_evaluation_dataset(args)
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    with accelerator.split_between_processes(list(range(len(dataset)))) as rows:
        shard = dataset.select(rows)
        offset = rows[0] if rows else 0
    predictions = locate_shard(geolocator, shard, args.batch_size, args.top_k, offset,
                               show_progress=accelerator.is_local_main_process, ten_crop=args.ten_crop)
    predictions = _gather(predictions)
    if accelerator.is_main_process:
        summary = write_results(predictions, args.output_dir, args.model, args.dataset, args.top_k, args.ten_crop)
        print(f"geoloc evaluate: {summary['n']} images scored, {summary['n_unreadable']} unreadable, "
              f"{accelerator.num_processes} process(es) -> {args.output_dir}")
        print(json.dumps({key: value for key, value in summary.items() if key != "best_of_top_k"}, indent=2))
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    from ..cli import run_command

    run_command("evaluate")
