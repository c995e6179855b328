"""`geoloc predict`: where were these photos taken (or: where does this text describe)?

Files and texts (answers printed as a table or `--json`):

    geoloc predict photo.jpg more/*.jpg --model ./geoclip-vit-l14 --top-k 5 [--places] [--json]
    geoloc predict --text "a beach with palm trees" --model ./geoclip-vit-l14
    geoloc predict photo.jpg --gallery my_points.csv     # search another GPS gallery (GeoCLIP only)
    geoloc predict                                         # the built-in demo: a map crop of the Sahara

An unreadable file is reported on stderr (and in `--json` as its `error`); the others are still answered, and
the exit status is 1.

Datasets (a photo archive: a folder of images, with or without metadata.csv, parquet/webdataset shards or a
Hub dataset, read with `geoloc.data.dataset.load_geo_dataset(..., coordinates=False)`: no coordinates are needed, and
rows with coordinates, valid or not, are all geolocated):

    geoloc predict --dataset DIR_OR_HUB_ID [--split train] --output predictions.csv|.parquet [--top-k 5]
        [--places] [--streaming] [--chunk-size 1024] [--batch-size 32]

- The dataset runner (`geoloc.inference.runner`, shared with `geoloc evaluate`) writes the output: one row per
  image and rank, `id,rank,latitude,longitude,probability,candidate` (`rank` 1 = best), plus for a calibrated
  model `confidence_<r>km`, `unfamiliar`, `unfamiliarity`, and `place,country,km` with `--places`
  (`geoloc.geography.places`: the nearest town (GeoNames), the country the point lies in by Natural Earth
  polygons (empty at sea), the km to the town). `id` is the row's `id` column, else its image's path relative
  to a local dataset folder (`a/x.jpg`; the file name otherwise), else its row number. Rows come in dataset
  order.
- Unreadable images are not fatal: they go to `OUTPUT_STEM.errors.csv` (`id,error`) next to the output, and
  the run goes on.
- Work is done in chunks of `--chunk-size` consecutive rows, each written atomically to
  `OUTPUT.parts/chunk-NNNNNN.parquet` as soon as it is done; when all are done they are merged into OUTPUT
  and the parts folder is removed. A rerun of a killed job resumes from the parts already written (it loses at
  most the chunks in progress, one per process), and refuses options that differ from the first run's
  (`OUTPUT.parts/manifest.json`); it says how much it kept ("Resumed: 1,200 of 3,000 rows already predicted").
  A rerun once OUTPUT exists does nothing: an existing output is never rewritten. A second run while the first
  is alive refuses (`OUTPUT.lock` holds the first one's pid), and the workers of `accelerate launch` end when
  their launcher dies.
- Many processes: chunk c is done by process `c % num_processes`, so each image is geolocated exactly once, in
  the same batches as on one process (the same answers: the same rows and coordinates; on CPU, probabilities
  equal to float32 rounding, since MKL's sums depend on memory alignment, and bit-identical with
  `MKL_CBWR=AUTO,STRICT` set), and a resumed run may use another process count:

      accelerate launch --num_processes 8 -m geoloc.inference.predict --dataset DIR --output predictions.parquet
      # CPU-only machine: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 4 -m geoloc.inference.predict ...

  Across nodes, start the same command on every node with `--num_machines M --machine_rank R
  --main_process_ip HOST --main_process_port PORT` (`--num_processes` counts all processes of all nodes);
  OUTPUT must be on a file system every node sees (the parts are written there, and the main process merges
  them). The dataset must be readable from every node (the same path, or a Hub id).
- `--streaming` reads a Hub dataset as it downloads (an `IterableDataset`). Every process reads the whole
  stream but decodes and geolocates only its own chunks; a resumed run reads past the chunks already done.
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from .runner import DECODE_WORKERS, OUTPUT_FORMATS

# With no input, `geoloc predict` geolocates a crop of the bundled world map around this point.
DEMO_NAME, DEMO_LATITUDE, DEMO_LONGITUDE = "Sahara", 23.0, 10.0


def build_parser() -> argparse.ArgumentParser:
    from ..cli import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="geoloc predict",
        description="Predict the GPS location of images (or of text descriptions, for GeoCLIP models), of files "
        "or of a whole dataset (see `python -m pydoc geoloc.inference.predict` for resuming and multi-process runs).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("images", nargs="*", metavar="IMAGE",
                        help="image files to geolocate (none, and no --text or --dataset: a built-in demo crop of "
                        "the Natural Earth map)")
    parser.add_argument("--text", action="append", metavar="TEXT",
                        help="a text query instead of images (repeat for several; GeoCLIP models only)")
    parser.add_argument("--model", default="default",
                        help="checkpoint folder or Hub id; 'default' is the bundled toy model (geoloc.DEFAULT_MODEL)")
    parser.add_argument("--top-k", type=int, default=5, help="predictions per input")
    parser.add_argument("--gallery", help="replace the model's GPS gallery: a CSV (LAT/LON or latitude/longitude "
                        "columns) or a Hub dataset id (GeoCLIP models only)")
    parser.add_argument("--batch-size", type=int, default=32, help="inputs per forward pass (and process)")
    parser.add_argument("--tower", choices=("fp32", "bf16", "int8"), default="fp32",
                        help="GeoCLIP image-tower precision: bf16 for CPUs with AVX512-BF16/AMX (and GPUs), int8 "
                        "(dynamic quantisation) for other CPUs; the gallery search stays float32")
    parser.add_argument("--places", action="store_true",
                        help="add the nearest populated place of each prediction (offline GeoNames)")
    parser.add_argument("--json", action="store_true", help="print the predictions as JSON (files and texts)")
    data = parser.add_argument_group("datasets")
    data.add_argument("--dataset", help="image folder with metadata.csv, parquet/webdataset shards or a Hub dataset "
                      "id: geolocate every image, write --output")
    data.add_argument("--output", help="predictions file for --dataset: .csv or .parquet")
    data.add_argument("--split", default="train", help="split of --dataset (a plain image folder is 'train')")
    data.add_argument("--streaming", action="store_true", help="stream --dataset instead of downloading it first")
    data.add_argument("--chunk-size", type=int, default=1024,
                      help="rows per resumable unit of work (at most this many are redone after a kill)")
    data.add_argument("--image-column", default="image", help="image column of --dataset")
    data.add_argument("--decode-workers", type=int, default=DECODE_WORKERS,
                      help="threads that decode and process the next batches while the model runs (0: none)")
    return parser


def main(argv=None) -> int:
    """Run `geoloc predict`; returns the exit status (0 ok, 1 when an input could not be read, 2 bad arguments).
    A bad model or dataset raises; `geoloc` (the dispatcher) turns that into one line on stderr and exit 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_arguments(parser, args)
    check_sources(args)
    if args.dataset:
        return predict_dataset(args)
    return predict_inputs(args)


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from ..cli import check_minimums

    if sum(map(bool, (args.images, args.text, args.dataset))) > 1:
        parser.error("give image files, --text queries or --dataset (one of them)")
    if args.dataset and not args.output:
        parser.error("--dataset needs --output FILE.csv or FILE.parquet")
    if args.output and not args.dataset:
        parser.error("--output is for --dataset; files and texts are printed (use --json for JSON)")
    if args.output and Path(args.output).suffix.lower() not in OUTPUT_FORMATS:
        parser.error(f"--output must end in {' or '.join(OUTPUT_FORMATS)}, got {args.output!r}")
    if args.dataset and args.json:
        parser.error("--json is for files and texts; --dataset writes --output")
    check_minimums(parser, args, top_k=1, batch_size=1, chunk_size=1, decode_workers=0)


def check_sources(args: argparse.Namespace) -> None:
    """Fail at once on a `--model` / `--dataset` that is neither a local path nor a Hub id (before any loading)."""
    from ..sources import check_local_or_hub

    if args.model != "default":
        check_local_or_hub(args.model, "--model")
    if args.dataset:
        check_local_or_hub(args.dataset, "--dataset", patterns=True)


def load_geolocator(args: argparse.Namespace, device=None):
    """The `Geolocator` for `--model` (with `--gallery` set as its gallery)."""
    from ..data.gallery import load_gallery
    from .adapter import Geolocator

    geolocator = Geolocator.from_pretrained(args.model, device=device, tower=args.tower)
    if args.gallery:
        if geolocator.capabilities.uncertainty != "gallery":
            raise ValueError(f"--gallery needs a model that searches a GPS gallery (GeoCLIP); "
                             f"{type(geolocator.model).__name__} predicts {geolocator.capabilities.uncertainty}.")
        geolocator.model.set_gallery(load_gallery(args.gallery), show_progress=True)
    return geolocator


def content_sha256(source: str, gallery: str | None = None) -> str:
    """SHA-256 of what the answers depend on: the checkpoint's config, image processor and weights (local or from
    the Hub cache) and the `--gallery` file, so that a resumed run refuses a model retrained in place."""
    from transformers.utils import cached_file

    from geo_core.integrity import checkpoint_files

    from .adapter import resolve_model

    source = resolve_model(source)
    settings = [cached_file(source, name, _raise_exceptions_for_missing_entries=False)
                for name in ("config.json", "preprocessor_config.json")]
    digest = hashlib.sha256((gallery or "").encode())  # a gallery that is not a local file is named
    local_gallery = [gallery] if gallery and os.path.isfile(gallery) else []
    for file in [*filter(None, settings), *checkpoint_files(source, {}), *local_gallery]:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ files and texts
def predict_inputs(args: argparse.Namespace) -> int:
    """Geolocate the image files (or texts, or the demo crop) and print the answers."""
    demo = not args.images and not args.text
    if demo:
        print(f"No image given: geolocating a built-in demo, a crop of the Natural Earth map around "
              f"({DEMO_LATITUDE}, {DEMO_LONGITUDE}) ({DEMO_NAME}), with "
              f"{'the bundled toy model' if args.model == 'default' else args.model}.", file=sys.stderr)
    geolocator = load_geolocator(args)
    options = {"top_k": args.top_k, "places": args.places, "batch_size": args.batch_size}
    if args.text:
        results = geolocator.locate_texts(args.text, **options)
    elif demo:
        results = geolocator.locate_images([_demo_image()], names=[f"demo crop ({DEMO_NAME})"], **options)
    else:
        results = _locate_with_progress(geolocator, args.images, options)
    for result in results:
        if result.error:
            print(f"geoloc predict: error: {result.error}", file=sys.stderr)
    if args.json:
        print(json.dumps([result.to_dict() for result in results], indent=2, allow_nan=False))
    else:
        _print_table(results)
    if demo:
        from ..geography.geodesy import geodesic_distance_km

        best = results[0]
        error = geodesic_distance_km(best.latitudes[:1], best.longitudes[:1], [DEMO_LATITUDE], [DEMO_LONGITUDE])[0]
        print(f"True location: ({DEMO_LATITUDE}, {DEMO_LONGITUDE}); the top prediction is {float(error):.0f} km away.",
              file=sys.stderr)
    return 1 if any(result.error for result in results) else 0


def _locate_with_progress(geolocator, images: list[str], options: dict) -> list:
    from tqdm.auto import tqdm

    results = []
    with tqdm(total=len(images), unit="image", desc="Geolocating", disable=len(images) <= options["batch_size"]) as bar:
        for start in range(0, len(images), options["batch_size"]):
            results += geolocator.locate_images(images[start : start + options["batch_size"]], **options)
            bar.update(len(results) - bar.n)
    return results


def _demo_image():
    """A 32x32 crop of the bundled Natural Earth map around the demo point, as the default model was trained on."""
    import numpy as np

    from ..data.worldmap import render_crop

    return render_crop(DEMO_LATITUDE, DEMO_LONGITUDE, np.random.default_rng(0), jitter=0.0, brightness=0.0)


def _print_table(results: list) -> None:
    for result in results:
        print(result.input)
        if result.error:
            print(f"  error: {result.error}")
        for rank, (lat, lon, p) in enumerate(zip(result.latitudes, result.longitudes, result.probabilities), 1):
            place = result.places[rank - 1] if result.places else None
            near = f"   {place['name']}" if place else ""
            print(f"  {rank}. {lat:10.6f}, {lon:11.6f}   p={p:.4f}{near}")
        if result.unfamiliar:  # calibrated models (`geoloc calibrate`): one plain sentence instead of a confidence
            print(f"  unfamiliar: this image does not look like what the model was trained on "
                  f"(score {result.unfamiliarity:.2f}); the guesses above are not an answer")
        elif result.confidence:
            print("  chance the true place is within " + ", ".join(
                f"{radius:,} km: {p:.0%}" for radius, p in result.confidence.items()) + " of guess 1")


# ------------------------------------------------------------------------------------------------ datasets
def predict_dataset(args: argparse.Namespace) -> int:
    """Geolocate every image of `--dataset` into `--output` with the dataset runner (`runner.run_dataset`)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from ..data.dataset import load_geo_dataset
    from .runner import DatasetRun, errors_path, run_dataset

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as `Accelerator()` reads it
    output = Path(args.output)
    # the model and gallery by content, not path: one retrained in place must not be mixed with the old answers
    options = {"model_sha256": content_sha256(args.model, args.gallery), "dataset": args.dataset, "split": args.split,
               "streaming": args.streaming, "chunk_size": args.chunk_size, "top_k": args.top_k,
               "places": args.places, "tower": args.tower}
    run = DatasetRun(output, options, args.top_k, args.batch_size, args.chunk_size, places=args.places,
                     root=args.dataset if os.path.isdir(args.dataset) else None, streaming=args.streaming,
                     decode_workers=args.decode_workers, label=f"--output {output}")
    done = run_dataset(run, state, lambda: load_geo_dataset(args.dataset, split=args.split,
                                                            image_column=args.image_column, streaming=args.streaming,
                                                            coordinates=False),
                       lambda device: load_geolocator(args, device=device))
    if done is None and output.exists() and state.is_main_process:
        print(f"geoloc predict: {output} already exists and no run is in progress "
              f"({output.name}.parts is absent): nothing to do. Delete it, or give another --output, to run again.")
    elif done is not None:
        images, unreadable = done
        report = f", {unreadable} unreadable (listed in {errors_path(output)})" if unreadable else ""
        print(f"geoloc predict: {images} images geolocated{report}, {state.num_processes} process(es) -> {output}")
    return 0


if __name__ == "__main__":
    from ..cli import run_command

    run_command("predict")
