"""Prediction speed: our GeoCLIP vs the official `GeoCLIP.predict` (PyPI geoclip==1.3.0), same backbone.

Both models get the same random CLIP image tower (no download: the official `ImageEncoder(from_pretrained=False)`
builds a ViT-L/14, or a small 224-px CLIP for `small`, and its weights are copied into ours), the released
GPS-encoder/MLP weights and the 100K gallery, so their predictions must agree; the script checks that.
The official `predict` re-encodes its 100K gallery on every call; ours encodes it once at conversion.
A third part times exact top-k over a 1M-point gallery (`geolocate(clip_image_embeds=...)`, the search
alone) with a small location encoder of the official width (512), since encoding 1M points with the
official encoder is a one-off cost not being measured here.

    python -m benchmarks.bench_geoclip_predict [--backbones vit-l14 small] [--images 8] [--official-images 2]
        [--towers fp32 int8 bf16] [--agreement-images 16] [--trained-agreement-images 200]
        [--throughput-batches 1 8 32]

A fourth part runs the converted ViT-L/14-shaped model (random CLIP weights: fine for speed, and the same
weights for every tower) through `Geolocator.from_pretrained(..., tower=...)` for each reduced-precision tower:
per-image time and speed-up over the official `predict` (timed in the same round-robin), top-5 agreement with the fp32
tower's answers (same points in order / same set / same best point / same set up to near-ties) on world-map crops
and photo-like images (smooth colour fields with texture, JPEG-compressed), and batched throughput (images/s,
preprocessing excluded) at each batch size; then whether this CPU has AVX512-BF16 / AMX and which tower is best
with and without them.
Random ViT-L/14 weights map every image to nearly the same embedding, so the same agreement is also measured
with trained weights: the bundled GeoCLIP (`geoloc.DEFAULT_MODEL`, a trained tiny tower) under each tower option.
Last, the share of images whose fp32 fifth and sixth answers are near-ties: the floor on how often any tower that
moves the logits at all can change the top-5 set.

Needs the official wheel (fetched once with `pip download`, like the parity test). Prints a markdown table.
"""

import argparse
import io
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

import geoloc
from geoloc.allocator import keep_freed_memory
from geoloc.configs import tiny_clip_configs
from geoloc.hub.convert import convert_geoclip
from geoloc.inference.adapter import Geolocator
from geoloc.inference.tower_speed import TOWER_CHOICES, cpu_features, cpu_supports_bf16
from geoloc.data.worldmap import render_crop, sample_points
from geoloc.geography.geodesy import geodesic_distance_km
from official_geoclip import fetch_official_wheel, load_official_geoclip
from geoloc.pipeline import TASK
from modeling_geoclip import GeoCLIPConfig, GeoCLIPLocationEncoderConfig, GeoCLIPModel

TOP_K = 5
# Log-probability within which two answers count as tied under fp32 (a 1% probability ratio), and how many fp32
# answers are looked up to find where a reduced-precision tower's answers rank.
TIE_TOLERANCE = 0.01
TIE_LOOKUP = 50
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


def _compare(code, wheel, backbone: str, folder: Path, photos: list[str], args) -> tuple[dict, object]:
    """Time the official predict and ours with the same random `backbone`; check their answers agree. Returns the
    figures and the official model (timed again beside the reduced-precision towers)."""
    official = _official_model(code, backbone)
    start = time.perf_counter()
    backbone_config = None if backbone == "vit-l14" else _small_clip_configs()
    convert_geoclip(wheel, folder / backbone, random_backbone=True, backbone_config=backbone_config)
    print(f"{backbone}: converted (100K gallery encoded once, saved) in {time.perf_counter() - start:.1f} s")
    geolocator = pipeline(TASK, model=str(folder / backbone))
    clip = official.image_encoder.CLIP
    geolocator.model.image_tower.vision_model.load_state_dict(clip.vision_model.state_dict())
    geolocator.model.image_tower.visual_projection.load_state_dict(clip.visual_projection.state_dict())

    official.predict(photos[0], top_k=TOP_K)  # warm-up, as ours below: first calls pay one-off costs
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

    agree, probability_gap = 0, 0.0
    for (gps, probabilities), predictions in zip(official_results, our_results):
        ours_gps = torch.tensor([[p["latitude"], p["longitude"]] for p in predictions], dtype=torch.float64)
        ours_probabilities = torch.tensor([p["probability"] for p in predictions], dtype=torch.float64)
        same_points = bool(torch.allclose(ours_gps, gps.double(), atol=1e-5))
        agree += same_points
        if same_points:  # the same points, so the same ranks: compare each point's probability
            gap = ((ours_probabilities - probabilities.double()) / probabilities.double().clamp(min=1e-30)).abs()
            probability_gap = max(probability_gap, gap.max().item())
    return official, {
        "official": statistics.median(official_times), "n_official": len(official_times),
        "ours": statistics.median(our_times), "n_ours": len(our_times),
        "batched": batched_times[0] / len(photos), "agree": agree,
        "probability_gap": probability_gap,
    }


def _photo_like(count: int, seed: int) -> list[Image.Image]:
    """Photo-like 640x480 images: smooth random colour fields (low-frequency noise upsampled) with fine texture,
    JPEG-compressed, unlike the random-pixel images of the speed rows."""
    generator = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        base = Image.fromarray(generator.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((640, 480),
                                                                                            Image.Resampling.BICUBIC)
        texture = generator.normal(0, 12, (480, 640, 3))
        pixels = np.clip(np.asarray(base, dtype=np.float64) + texture, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
        images.append(Image.open(buffer).convert("RGB"))
    return images


def _tower_section(folder: Path, photos: list[str], official, args) -> tuple[list[str], str, list[float]]:
    """Per-image time, speed-up over the official predict (timed in the same round-robin), top-5 agreement with
    fp32 and batched throughput per tower of the converted ViT-L/14-shaped model (see the module docstring).
    Returns the table rows, the near-ties note and the official predict's times (one per round)."""
    towers = [tower for tower in args.towers if tower != "bf16" or cpu_supports_bf16()]
    geolocators = {tower: Geolocator.from_pretrained(folder, tower=tower) for tower in towers}
    rng = np.random.default_rng(5)
    crops = [render_crop(lat, lon, rng, window=224, size=224) for lat, lon in sample_points(args.agreement_images, rng)]
    kinds = {"world-map crops": crops, "photo-like images": _photo_like(args.agreement_images, seed=6)}
    processor = geolocators[towers[0]].image_processor
    pixels = {kind: processor(images, return_tensors="pt").pixel_values for kind, images in kinds.items()}

    def answers(tower, kind, top_k=TOP_K):
        results = []
        for batch in pixels[kind].split(8):
            results += geolocators[tower].locate_pixel_values(batch, top_k=top_k)
        return results

    reference = {kind: answers("fp32", kind, TIE_LOOKUP) for kind in kinds} if "fp32" in towers else None
    trained, trained_ties = {}, None
    if reference is not None:
        trained, trained_ties = _trained_agreement(towers, args.trained_agreement_images)
    per_image = {tower: [] for tower in towers}
    official_times = []
    for _ in range(args.tower_repeats):  # round-robin: load drift hits every tower and the official path alike
        official_times += _timed(lambda: official.predict(photos[0], top_k=TOP_K), 1)[0]
        for tower in towers:
            # Untimed first: each timed call follows one of the same tower, as when a folder is answered (the
            # round-robin's switch from another tower's weights and buffers is not what a user pays per image).
            geolocators[tower].locate_images([photos[0]], top_k=TOP_K)
            start = time.perf_counter()
            geolocators[tower].locate_images([photos[0]], top_k=TOP_K)
            per_image[tower].append(time.perf_counter() - start)
    official_seconds = statistics.median(official_times)
    rows = []
    for tower in towers:
        seconds = statistics.median(per_image[tower])
        agree = []
        for kind in kinds:
            if reference is None or tower == "fp32":
                agree.append("reference" if tower == "fp32" else "–")
                continue
            agree.append(_agreement(answers(tower, kind), reference[kind]))
        throughput = []
        for batch in args.throughput_batches:
            block = torch.cat([pixels["world-map crops"], pixels["photo-like images"]])
            block = block.repeat(-(-batch // len(block)), 1, 1, 1)[:batch]
            start = time.perf_counter()
            geolocators[tower].locate_pixel_values(block, top_k=TOP_K)
            throughput.append(f"{batch / (time.perf_counter() - start):.2f}")
        speedup = f"**{official_seconds / seconds:.0f}x**"
        rows.append(f"| {tower} | {seconds:.3f} s | {speedup} | {agree[0]} | {agree[1]} | "
                    f"{' | '.join(trained.get(tower, ('reference' if tower == 'fp32' else '–',) * 2))} | "
                    f"{' / '.join(throughput)} | {os.getloadavg()[0]:.1f} |")
    if reference is None:
        return rows, "", official_times
    shares = [_near_ties(reference[kind]) for kind in kinds] + list(trained_ties)
    return rows, ("Images whose fp32 fifth and sixth answers lie within {tol} in log-probability (near-ties no "
                  "reduced-precision tower can be sure to keep): ViT-L/14 {:.3f} crops, {:.3f} photo-like; trained "
                  "tiny {:.3f} crops, {:.3f} photo-like.").format(*shares, tol=TIE_TOLERANCE), official_times


def _agreement(answers: list, reference: list) -> str:
    """How often `answers` (per image, a top-5 `GeolocationResult`) match the fp32 tower's `reference` (per image,
    its top `TIE_LOOKUP`): the same points in the same order / the same set of points / the same best point / a
    top-5 that fp32 ranks within `TIE_TOLERANCE` of its own fifth (each answered point's fp32 log-probability at
    least the fifth's minus the tolerance: only near-ties swapped); then, over the images whose best point changed,
    the median and largest distance between the two best points."""
    order, points, best, up_to_ties, moved = [], [], [], [], []
    for answer, expected in zip(answers, reference):
        ours, theirs = _points(answer), _points(expected)
        order.append(ours == theirs[:TOP_K])
        points.append(set(ours) == set(theirs[:TOP_K]))
        best.append(ours[0] == theirs[0])
        log_probabilities = dict(zip(theirs, np.log(expected.probabilities)))
        fifth = np.log(expected.probabilities[TOP_K - 1])
        up_to_ties.append(all(log_probabilities.get(point, -np.inf) >= fifth - TIE_TOLERANCE for point in ours))
        moved.append(float(geodesic_distance_km(*ours[0], *theirs[0])[0]))
    moved = [km for km in moved if km > 0]
    where = f"{np.median(moved):.0f} / {max(moved):.0f} km" if moved else "–"
    return " / ".join(f"{np.mean(x):.3f}" for x in (order, points, best, up_to_ties)) + f"; moved best: {where}"


def _points(result) -> list[tuple[float, float]]:
    return list(zip(result.latitudes.tolist(), result.longitudes.tolist()))


def _near_ties(reference: list) -> float:
    """Share of images whose fp32 fifth and sixth answers lie within `TIE_TOLERANCE` in log-probability: a tower
    whose logits move by more than that may swap them, however good it is."""
    return float(np.mean([np.log(r.probabilities[TOP_K - 1] / r.probabilities[TOP_K]) < TIE_TOLERANCE
                          for r in reference]))


def _trained_agreement(towers: list[str], count: int) -> tuple[dict[str, tuple[str, str]], tuple[float, float]]:
    """Agreement with the fp32 tower (`_agreement`) of each reduced-precision tower of the bundled GeoCLIP, whose
    tiny tower was trained (`geoloc.DEFAULT_MODEL`; 32 px): world-map crops as it was trained on and photo-like
    images, `count` of each. Random ViT-L/14 weights map every image to nearly the same embedding, so their
    agreement says little; these weights separate images as trained ones do."""
    geolocators = {tower: Geolocator.from_pretrained(geoloc.DEFAULT_MODEL, tower=tower) for tower in towers}
    rng = np.random.default_rng(7)
    kinds = [[render_crop(lat, lon, rng) for lat, lon in sample_points(count, rng)], _photo_like(count, seed=8)]
    processor = geolocators["fp32"].image_processor
    pixels = [processor(images, return_tensors="pt").pixel_values for images in kinds]

    reference = [geolocators["fp32"].locate_pixel_values(batch, top_k=TIE_LOOKUP) for batch in pixels]
    agreement = {tower: tuple(_agreement(geolocators[tower].locate_pixel_values(batch, top_k=TOP_K), expected)
                              for batch, expected in zip(pixels, reference))
                 for tower in towers if tower != "fp32"}
    return agreement, tuple(_near_ties(expected) for expected in reference)


def _best_tower_note(rows: list[str]) -> str:
    features = cpu_features()
    kind = ("AMX" if features["amx_bf16"] else "AVX512-BF16 without AMX" if features["avx512_bf16"]
            else "neither AVX512-BF16 nor AMX")
    timed = {row.split("|")[1].strip(): float(row.split("|")[2].split()[0]) for row in rows}
    fastest = min(timed, key=timed.get)
    flags = ", ".join(f"{name} {'yes' if value else 'no'}" for name, value in features.items())
    refused = ("bf16 is refused here" if not features["bf16_kernels"]
               else "on CPUs without AVX512-BF16/AMX bf16 is refused")
    return (f"This CPU: {flags} ({kind}). Fastest tower measured here: **{fastest}**. ({refused}: emulated bfloat16 "
            "is slower than fp32; int8 runs on any x86-64/ARM CPU.)")


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
    parser.add_argument("--gallery-size", type=int, default=1_000_000, help="0: skip the large-gallery rows")
    parser.add_argument("--towers", nargs="+", choices=TOWER_CHOICES, default=list(TOWER_CHOICES),
                        help="towers of the ViT-L/14 part (bf16 only where the CPU has native bfloat16)")
    parser.add_argument("--agreement-images", type=int, default=16, help="world-map crops and photo-like images, each")
    parser.add_argument("--trained-agreement-images", type=int, default=200,
                        help="world-map crops and photo-like images, each, for the bundled trained model's agreement")
    parser.add_argument("--throughput-batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tower-repeats", type=int, default=3, help="per-image timings per tower")
    args = parser.parse_args(argv)
    kept = keep_freed_memory()  # as the geoloc CLI does; process-wide, so the official side runs with it too
    print(f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, {torch.get_num_threads()} "
          f"torch threads; freed memory kept in the process (geoloc.allocator): {'yes' if kept else 'no'}", flush=True)

    wheel = fetch_official_wheel()
    code = load_official_geoclip(wheel)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        photos = _photos(folder, args.images)
        results, officials = {}, {}
        for backbone in args.backbones:
            officials[backbone], results[backbone] = _compare(code, wheel, backbone, folder, photos, args)
            print(f"{backbone}: {results[backbone]} (load {os.getloadavg()[0]:.1f})", flush=True)
        tower_rows, ties_note = [], ""
        if "vit-l14" in args.backbones and args.towers:
            tower_rows, ties_note, tower_official = _tower_section(folder / "vit-l14", photos, officials["vit-l14"],
                                                                   args)
            print("\n".join(tower_rows), flush=True)

    if args.gallery_size:
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
    if args.gallery_size:
        print(f"| – | exact top-5 over {args.gallery_size:,} points, 1 query | – | {gallery_single:.1f} ms | – |")
        print(f"| – | exact top-5 over {args.gallery_size:,} points, per query in a batch of {args.batch_size} | – "
              f"| {gallery_batched:.1f} ms | – |")
    if tower_rows:
        print()
        print(f"ViT-L/14-shaped tower (random weights), stored 100K gallery, exact search; per image: one 640x480 JPEG "
              f"per call, preprocessing included, median of {args.tower_repeats} round-robin, each timed call right "
              f"after an untimed one of the same tower, the official predict timed once per round; agreement with the "
              f"fp32 tower's top-{TOP_K} gallery answers, as same points in the same order / same set of points / same "
              f"best point / same set up to near-ties (each point within {TIE_TOLERANCE} in fp32 log-probability "
              f"of fp32's fifth): ViT-L/14 (random weights) on {args.agreement_images} images of each kind, and the "
              f"bundled GeoCLIP (trained tiny tower) on {args.trained_agreement_images} of each; throughput: one "
              f"batch of processed pixels. The official predict's rounds: "
              f"{' / '.join(f'{seconds:.1f}' for seconds in tower_official)} s.")
        print()
        print(f"| tower | per image | vs official predict ({statistics.median(tower_official):.1f} s) | agreement, "
              f"ViT-L/14, world-map crops | ViT-L/14, photo-like | trained tiny, world-map crops | trained tiny, "
              f"photo-like | images/s at batch {' / '.join(map(str, args.throughput_batches))} | load |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(tower_rows))
        print()
        print(_best_tower_note(tower_rows))
        print(ties_note)
    print()
    for backbone, r in results.items():
        print(f"{BACKBONES[backbone]}: official and our top-{TOP_K} points agree (to 1e-5 deg) on {r['agree']} of "
              f"{r['n_official']} images; on those, probabilities differ by at most {100 * r['probability_gap']:.3f} % "
              "(relative; galleries from 65,536 points estimate the softmax's normaliser from an int8 pass, within "
              "~0.15 %; `scan='none'` gives the exact one).")


if __name__ == "__main__":
    main()
