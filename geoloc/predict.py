"""`geoloc predict`: where were these photos taken (or: where does this text describe)?

    geoloc predict photo.jpg more/*.jpg --model ./geoclip-vit-l14 --top-k 5 --batch-size 8 [--json]
    geoloc predict --text "a beach with palm trees" --model ./geoclip-vit-l14
    geoloc predict photo.jpg --gallery my_points.csv     # search another GPS gallery (GeoCLIP only)
    geoloc predict                                         # the built-in demo: a map crop of the Sahara
"""

import argparse
import inspect
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, pipeline

from modeling_geoclip.pipeline_geoclip import TASK
from modeling_geoclip.processing_geoclip import MAX_IMAGE_PIXELS

from .data import decode_image
from .gallery import load_gallery
from .geodesy import geodesic_distance_km

# The bundled tiny world-map GeoCLIP (a toy trained on Natural Earth map crops: see its README.md).
DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "geoclip-worldmap-tiny"
# With no input, `geoloc predict` geolocates a crop of the bundled world map around this point.
DEMO_NAME, DEMO_LATITUDE, DEMO_LONGITUDE = "Sahara", 23.0, 10.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geoloc predict",
        description="Predict the GPS location of images (or of text descriptions, for GeoCLIP models).",
    )
    parser.add_argument("images", nargs="*", metavar="IMAGE",
                        help="image files to geolocate (none: a built-in demo crop of the Natural Earth map)")
    parser.add_argument("--text", action="append", metavar="TEXT",
                        help="a text query instead of images (repeat for several; GeoCLIP models only)")
    parser.add_argument("--model", help=f"checkpoint folder or Hub id (default: the bundled {DEFAULT_MODEL.name})")
    parser.add_argument("--top-k", type=int, default=5, help="predictions per input (default: 5)")
    parser.add_argument("--gallery", help="replace the model's GPS gallery: a CSV (LAT/LON or latitude/longitude "
                        "columns) or a Hub dataset id (GeoCLIP models only)")
    parser.add_argument("--batch-size", type=int, default=8, help="inputs per forward pass (default: 8)")
    parser.add_argument("--json", action="store_true", help="print the predictions as JSON")
    return parser


def _resolve_model(model: str | None) -> str:
    if model is not None:
        looks_local = Path(model).is_absolute() or model.startswith(".") or model.count("/") > 1
        if looks_local and not Path(model).is_dir():
            raise ValueError(f"Model folder '{model}' does not exist (pass a checkpoint folder or a Hub id).")
        return model
    if not DEFAULT_MODEL.is_dir():
        raise ValueError(
            f"No --model given and the bundled default model is not installed at {DEFAULT_MODEL}. Pass "
            "--model PATH_OR_HUB_ID, e.g. a folder written by `geoloc convert`."
        )
    return str(DEFAULT_MODEL)


def _predictions(output, row: int) -> list[dict]:
    columns = (output.latitudes[row].tolist(), output.longitudes[row].tolist(), output.probabilities[row].tolist())
    return [{"latitude": lat, "longitude": lon, "probability": p} for lat, lon, p in zip(*columns)]


def _set_gallery(model, gallery: str) -> None:
    if not hasattr(model, "set_gallery"):
        raise ValueError(f"--gallery needs a GeoCLIP model; {type(model).__name__} predicts cells, not gallery points.")
    model.set_gallery(load_gallery(gallery), show_progress=True)


def _predict_texts(args, model_id: str) -> list[dict]:
    model = AutoModel.from_pretrained(model_id).eval()
    if "input_ids" not in inspect.signature(model.geolocate).parameters:
        raise ValueError(f"--text needs a GeoCLIP model; {type(model).__name__} only geolocates images.")
    if args.gallery:
        _set_gallery(model, args.gallery)
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    results = []
    for start in range(0, len(args.text), args.batch_size):
        texts = args.text[start : start + args.batch_size]
        tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        output = model.geolocate(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, top_k=args.top_k)
        results += [{"input": text, "predictions": _predictions(output, row)} for row, text in enumerate(texts)]
    return results


def _demo_image() -> Image.Image:
    """A 32x32 crop of the bundled Natural Earth map around the demo point, as the default model was trained on."""
    from .worldmap import render_crop

    return render_crop(DEMO_LATITUDE, DEMO_LONGITUDE, np.random.default_rng(0), jitter=0.0, brightness=0.0)


def _predict_images(args, model_id: str) -> list[dict]:
    """One result per input, in order: `{"input", "predictions"}`, or `{"input", "error"}` for an unreadable image
    (the others are still answered)."""
    # Loaded here (not by `pipeline`) so that a bad checkpoint gives our error, not the pipeline's retry report.
    geolocator = pipeline(TASK, model=AutoModel.from_pretrained(model_id), image_processor=model_id)
    if args.gallery:
        _set_gallery(geolocator.model, args.gallery)
    max_pixels = getattr(geolocator.image_processor, "max_image_pixels", MAX_IMAGE_PIXELS)
    results = []
    with tqdm(total=len(args.images), unit="image", desc="Geolocating",
              disable=True if len(args.images) < 2 else None) as progress:  # None: off when stderr is no terminal
        for start in range(0, len(args.images), args.batch_size):
            inputs = args.images[start : start + args.batch_size]
            batch = [{"input": image if isinstance(image, str) else f"demo crop ({DEMO_NAME})"} for image in inputs]
            decoded = {}
            for position, image in enumerate(inputs):
                try:
                    decoded[position] = decode_image(image, max_pixels)
                except ValueError as error:
                    batch[position]["error"] = str(error)
            if decoded:
                predictions = geolocator(list(decoded.values()), top_k=args.top_k, batch_size=len(decoded))
                for position, rows in zip(decoded, predictions):
                    batch[position]["predictions"] = rows
            results += batch
            progress.update(len(batch))
    return results


def _print_table(results: list[dict]) -> None:
    for result in results:
        print(result["input"])
        if "error" in result:
            print(f"  unreadable: {result['error']}")
            continue
        for rank, prediction in enumerate(result["predictions"], start=1):
            print(f"  {rank}. {prediction['latitude']:10.6f}, {prediction['longitude']:11.6f}"
                  f"   p={prediction['probability']:.4f}")


def main(argv=None) -> int:
    """Run `geoloc predict`; returns 0, exits 2 on bad arguments, and raises ValueError (or another error) on bad
    input or model, which `geoloc.cli` prints as one line with exit status 1. Unreadable images do not stop the
    others: they are reported in the output, then a ValueError counts them."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.images and args.text:
        parser.error("give image files or --text queries (not both)")
    demo = not args.images and not args.text
    if demo:
        args.images = [_demo_image()]
        print(f"No image given: geolocating a built-in demo, a crop of the Natural Earth map around "
              f"({DEMO_LATITUDE}, {DEMO_LONGITUDE}) ({DEMO_NAME}), with "
              f"{'the bundled toy model ' + DEFAULT_MODEL.name if args.model is None else args.model}.",
              file=sys.stderr)
    if args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    model_id = _resolve_model(args.model)
    results = _predict_texts(args, model_id) if args.text else _predict_images(args, model_id)
    if args.json:
        print(json.dumps(results, indent=2, allow_nan=False))
    else:
        _print_table(results)
    failed = [result for result in results if "error" in result]
    if failed:
        raise ValueError(f"{len(failed)} of {len(results)} images could not be read (first: {failed[0]['error']})")
    if demo:
        best = results[0]["predictions"][0]
        error = geodesic_distance_km([best["latitude"]], [best["longitude"]], [DEMO_LATITUDE], [DEMO_LONGITUDE])[0]
        print(f"True location: ({DEMO_LATITUDE}, {DEMO_LONGITUDE}); the top prediction is {float(error):.0f} km away.",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    from .cli import run_command

    run_command("predict")
