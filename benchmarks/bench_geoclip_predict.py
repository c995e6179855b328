"""Prediction speed: our GeoCLIP vs the official `GeoCLIP.predict` (PyPI geoclip==1.3.0), same backbone.

Both models get the same random CLIP image tower (no download: the official `ImageEncoder(from_pretrained=False)`
builds a ViT-L/14, or a small 224-px CLIP for `small`, and its weights are copied into ours), the released
GPS-encoder/MLP weights and the 100K gallery, so their predictions must agree; the script checks that.
The official `predict` re-encodes its 100K gallery on every call; ours encodes it once at conversion.
A third part times exact top-k over a 1M-point gallery (`geolocate(clip_image_embeds=...)`, the search
alone) with a small location encoder of the official width (512), since encoding 1M points with the
official encoder is a one-off cost not being measured here.

    python -m benchmarks.bench_geoclip_predict [--backbones vit-l14 small] [--images 8] [--official-images 2]

Needs the official wheel (fetched once with `pip download`, like the parity test). Prints a markdown table.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, pipeline

# The official GeoCLIP reference is test code (tests/official_geoclip.py), not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from geoloc.configs import tiny_clip_configs
from geoloc.hub.convert import convert_geoclip
from official_geoclip import fetch_official_wheel, load_official_geoclip
from geoloc.pipeline import TASK
from modeling_geoclip import GeoCLIPConfig, GeoCLIPLocationEncoderConfig, GeoCLIPModel

TOP_K = 5
BACKBONES = {"vit-l14": "CLIP ViT-L/14 (random)", "small": "small CLIP, 224 px (random)"}


def _timed(function, repeats: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return times, result


def _photos(folder: Path, count: int) -> list[str]:
    generator = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"photo{index}.jpg"
        Image.fromarray(generator.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def _small_clip_configs() -> tuple[CLIPVisionConfig, CLIPTextConfig]:
    """The tiny test CLIP at the official 224-pixel input and 768-d projection (what the official MLP takes)."""
    vision, text = tiny_clip_configs()
    vision.image_size, vision.patch_size = 224, 32
    vision.projection_dim = text.projection_dim = 768
    return vision, text


def _official_model(code, backbone: str):
    """The official GeoCLIP (released MLP, GPS encoder, logit scale) with a random CLIP of `backbone`'s shape."""
    if backbone == "vit-l14":
        return code.GeoCLIP(from_pretrained=True, clip_pretrained=False).eval()  # builds a random ViT-L/14
    vision, text = _small_clip_configs()
    original = code.image_encoder_module.CLIPModel
    code.image_encoder_module.CLIPModel = lambda config: CLIPModel(CLIPConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), projection_dim=768))
    try:
        return code.GeoCLIP(from_pretrained=True, clip_pretrained=False).eval()
    finally:
        code.image_encoder_module.CLIPModel = original


def _compare(code, wheel, backbone: str, folder: Path, photos: list[str], args) -> dict:
    """Time the official predict and ours with the same random `backbone`; check their answers agree."""
    official = _official_model(code, backbone)
    start = time.perf_counter()
    backbone_config = None if backbone == "vit-l14" else _small_clip_configs()
    convert_geoclip(wheel, folder / backbone, random_backbone=True, backbone_config=backbone_config)
    print(f"{backbone}: converted (100K gallery encoded once, saved) in {time.perf_counter() - start:.1f} s")
    geolocator = pipeline(TASK, model=str(folder / backbone))
    clip = official.image_encoder.CLIP
    geolocator.model.image_tower.vision_model.load_state_dict(clip.vision_model.state_dict())
    geolocator.model.image_tower.visual_projection.load_state_dict(clip.visual_projection.state_dict())

    official_times, official_results = [], []
    for photo in photos[: args.official_images]:
        times, result = _timed(lambda: official.predict(photo, top_k=TOP_K), 1)
        official_times += times
        official_results.append(result)
    geolocator(photos[0], top_k=TOP_K)  # warm-up
    our_times, our_results = [], []
    for photo in photos:
        times, result = _timed(lambda: geolocator(photo, top_k=TOP_K), 1)
        our_times += times
        our_results.append(result)
    batched_times, _ = _timed(lambda: geolocator(photos, top_k=TOP_K, batch_size=args.batch_size), 1)

    agree = 0
    for (gps, probabilities), predictions in zip(official_results, our_results):
        ours_gps = torch.tensor([[p["latitude"], p["longitude"]] for p in predictions], dtype=torch.float64)
        ours_probabilities = torch.tensor([p["probability"] for p in predictions], dtype=torch.float64)
        agree += bool(torch.allclose(ours_gps, gps.double(), atol=1e-5)
                      and torch.allclose(ours_probabilities, probabilities.double(), rtol=1e-3))
    return {
        "official": statistics.median(official_times), "n_official": len(official_times),
        "ours": statistics.median(our_times), "n_ours": len(our_times),
        "batched": batched_times[0] / len(photos), "agree": agree,
    }


def _large_gallery_model(size: int) -> GeoCLIPModel:
    """A GeoCLIP with a `size`-point gallery of 512-d embeddings, encoded by a small location encoder."""
    vision, text = _small_clip_configs()
    config = GeoCLIPConfig(
        vision_config=vision, text_config=text, use_text_tower=False,
        location_config=GeoCLIPLocationEncoderConfig(rff_dim=16, hidden_size=32, num_hidden_layers=1),
    )
    model = GeoCLIPModel(config).eval()
    generator = torch.Generator().manual_seed(0)
    unit = torch.rand(size, 2, generator=generator, dtype=torch.float64)
    model.set_gallery(unit * torch.tensor([180.0, 360.0]).double() - torch.tensor([90.0, 180.0]).double())
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", choices=list(BACKBONES), default=list(BACKBONES))
    parser.add_argument("--images", type=int, default=8, help="images for our per-image and batched timings")
    parser.add_argument("--official-images", type=int, default=2, help="images for the official predict")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gallery-size", type=int, default=1_000_000)
    args = parser.parse_args(argv)

    wheel = fetch_official_wheel()
    code = load_official_geoclip(wheel)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        photos = _photos(folder, args.images)
        results = {backbone: _compare(code, wheel, backbone, folder, photos, args) for backbone in args.backbones}

    large = _large_gallery_model(args.gallery_size)
    queries = torch.randn(args.batch_size, 768)
    large.geolocate(clip_image_embeds=queries[:1], top_k=TOP_K)  # warm-up
    single_times, _ = _timed(lambda: large.geolocate(clip_image_embeds=queries[:1], top_k=TOP_K), 10)
    batch_times, _ = _timed(lambda: large.geolocate(clip_image_embeds=queries, top_k=TOP_K), 5)
    gallery_single = statistics.median(single_times) * 1000
    gallery_batched = statistics.median(batch_times) * 1000 / args.batch_size

    load = os.getloadavg()
    print()
    print(f"CPU: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"load average {load[0]:.1f} (shared machine: numbers are noisy), torch {torch.__version__}")
    print("Random CLIP weights, the same in both; gallery: the official 100K; top-5; 640x480 JPEGs.")
    print()
    print("| backbone | measurement | official `GeoCLIP.predict` | ours | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    for backbone, r in results.items():
        print(f"| {BACKBONES[backbone]} | per image, one call each (n={r['n_official']} / {r['n_ours']}) | "
              f"{r['official']:.2f} s | {r['ours']:.3f} s | {r['official'] / r['ours']:.1f}x |")
        print(f"| {BACKBONES[backbone]} | per image, batched (batch {args.batch_size}) | {r['official']:.2f} s "
              f"(no batch API) | {r['batched']:.3f} s | {r['official'] / r['batched']:.1f}x |")
    print(f"| – | exact top-5 over {args.gallery_size:,} points, 1 query | – | {gallery_single:.1f} ms | – |")
    print(f"| – | exact top-5 over {args.gallery_size:,} points, per query in a batch of {args.batch_size} | – | "
          f"{gallery_batched:.1f} ms | – |")
    print()
    for backbone, r in results.items():
        print(f"{BACKBONES[backbone]}: official and our top-{TOP_K} agree (coordinates to 1e-5 deg, probabilities "
              f"to 0.1%) on {r['agree']} of {r['n_official']} images.")


if __name__ == "__main__":
    main()
