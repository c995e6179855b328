"""Prediction speed: our GeoCLIP vs the official `GeoCLIP.predict` (PyPI geoclip==1.3.0), same backbone.

Both models get the same random CLIP ViT-L/14 image tower (no download: the official
`ImageEncoder(from_pretrained=False)` builds one, and its weights are copied into ours), the released
GPS-encoder/MLP weights and the 100K gallery, so their predictions must agree; the script checks that.
The official `predict` re-encodes its 100K gallery on every call; ours encodes it once at conversion.
A third part times exact top-k over a 1M-point gallery (`geolocate(clip_image_embeds=...)`, the search
alone) with a small location encoder of the official width (512), since encoding 1M points with the
official encoder is a one-off cost not being measured here.

    python -m benchmarks.bench_geoclip_predict [--images 8] [--official-images 2] [--batch-size 8]

Needs the official wheel (fetched once with `pip download`, like the parity test). Prints a markdown table.
"""

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPTextConfig, CLIPVisionConfig, pipeline

from geoloc.official_geoclip import fetch_official_wheel, load_official_geoclip
from modeling_geoclip import GeoCLIPConfig, GeoCLIPLocationEncoderConfig, GeoCLIPModel
from modeling_geoclip.convert import convert_geoclip
from modeling_geoclip.pipeline_geoclip import TASK

TOP_K = 5


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


def _large_gallery_model(size: int) -> GeoCLIPModel:
    """A GeoCLIP with a `size`-point gallery of 512-d embeddings, encoded by a small location encoder."""
    config = GeoCLIPConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=16, projection_dim=768),
        use_text_tower=False,
        location_config=GeoCLIPLocationEncoderConfig(rff_dim=16, hidden_size=32, num_hidden_layers=1),
        text_config=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   projection_dim=768),
    )
    model = GeoCLIPModel(config).eval()
    generator = torch.Generator().manual_seed(0)
    unit = torch.rand(size, 2, generator=generator, dtype=torch.float64)
    model.set_gallery(unit * torch.tensor([180.0, 360.0]).double() - torch.tensor([90.0, 180.0]).double())
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images for our per-image and batched timings")
    parser.add_argument("--official-images", type=int, default=2, help="images for the official predict")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gallery-size", type=int, default=1_000_000)
    args = parser.parse_args(argv)

    official_code = load_official_geoclip(fetch_official_wheel())
    start = time.perf_counter()
    official = official_code.GeoCLIP(from_pretrained=True, clip_pretrained=False).eval()  # random ViT-L/14
    print(f"official model built in {time.perf_counter() - start:.1f} s")

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        start = time.perf_counter()
        convert_geoclip(fetch_official_wheel(), folder / "ours", random_backbone=True)  # ViT-L/14 shape
        print(f"ours converted (100K gallery encoded once, saved) in {time.perf_counter() - start:.1f} s")
        geolocator = pipeline(TASK, model=str(folder / "ours"))
        ours = geolocator.model
        ours.image_tower.vision_model.load_state_dict(official.image_encoder.CLIP.vision_model.state_dict())
        ours.image_tower.visual_projection.load_state_dict(official.image_encoder.CLIP.visual_projection.state_dict())
        photos = _photos(folder, args.images)

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

    large = _large_gallery_model(args.gallery_size)
    queries = torch.randn(args.batch_size, 768)
    large.geolocate(clip_image_embeds=queries[:1], top_k=TOP_K)  # warm-up
    single_times, _ = _timed(lambda: large.geolocate(clip_image_embeds=queries[:1], top_k=TOP_K), 10)
    batch_times, _ = _timed(lambda: large.geolocate(clip_image_embeds=queries, top_k=TOP_K), 5)

    official_per_image = statistics.median(official_times)
    ours_per_image = statistics.median(our_times)
    ours_batched = batched_times[0] / len(photos)
    gallery_single = statistics.median(single_times) * 1000
    gallery_batched = statistics.median(batch_times) * 1000 / args.batch_size
    load = os.getloadavg()
    print()
    print(f"CPU: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"load average {load[0]:.1f} (shared machine: numbers are noisy), torch {torch.__version__}")
    print("Backbone: CLIP ViT-L/14 shape, random weights (same in both); gallery 100K (official release); top-5.")
    print()
    print("| measurement | official `GeoCLIP.predict` | ours | speed-up |")
    print("| --- | --- | --- | --- |")
    print(f"| per image, one call per image (n={len(official_times)} / {len(our_times)}) | "
          f"{official_per_image:.2f} s | {ours_per_image:.2f} s | {official_per_image / ours_per_image:.1f}x |")
    print(f"| per image, batched (batch {args.batch_size}, n={len(photos)}) | {official_per_image:.2f} s "
          f"(no batch API) | {ours_batched:.2f} s | {official_per_image / ours_batched:.1f}x |")
    print(f"| exact top-5 over {args.gallery_size:,} points, 1 query | – | {gallery_single:.1f} ms | – |")
    print(f"| exact top-5 over {args.gallery_size:,} points, per query in a batch of {args.batch_size} | – | "
          f"{gallery_batched:.1f} ms | – |")
    print()
    print(f"Official and our top-{TOP_K} predictions agree (coordinates to 1e-5 deg, probabilities to 0.1%) "
          f"on {agree} of {len(official_results)} images.")


if __name__ == "__main__":
    main()
