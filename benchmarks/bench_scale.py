"""Geolocation at scale on CPU: per-image speed vs the official GeoCLIP `predict`, million-point galleries,
image-tower options, location encoding. Prints markdown tables, every figure beside its reference or goal,
with the machine's load average (one run; medians of repeated timings).

    python benchmarks/bench_scale.py [--points 1000000] [--synthetic 10000000] [--skip-compile] [--skip-towers]
        [--synthetic-only | --exact-100k-only]

The image towers of the speed rows are random ViT-L/14 (no CLIP download); the location encoder, image MLP and
logit scale are the released GeoCLIP weights from the official wheel (so gallery embeddings have their real
distribution). Retrieval recall is measured against exact search for three kinds of queries:
- image queries: world-map crops and random-pixel images through converted GeoCLIPs whose CLIP towers are the
  tiny random ones of `geoloc.configs` (projections 768), one tower pair per seed: one random tower maps every
  image to nearly the same embedding (pairwise cosine 0.93), so 30 seeds give spread-out queries;
- text queries: place descriptions through the same models' tiny random text towers;
- near queries (`queries_near`): a gallery embedding plus Gaussian noise of the same norm (cosine ~0.7 to
  it), the easy case for an inverted index; image and text queries are far from every gallery point (cosine
  ~0.2 to the best one), like those of a real model on images unlike its training data.
Torch threads are `geoloc.threads.set_threads()`'s pick (printed), and freed memory stays in the process
(`geoloc.allocator.keep_freed_memory()`), as the `geoloc` CLI does.
"""

import argparse
import copy
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The official GeoCLIP reference is test code (tests/official_geoclip.py), not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from geoloc.configs import TINY_IMAGE_SIZE, byte_level_clip_tokenizer, tiny_clip_configs
from geoloc.hub.convert import convert_official_state_dict, read_official_geoclip
from official_geoclip import fetch_official_wheel, load_official_geoclip
from geoloc.allocator import keep_freed_memory
from geoloc.threads import set_threads
from geoloc.data.worldmap import render_crop, sample_points
from modeling_geoclip import GeoCLIPConfig, GeoCLIPImageProcessor, GeoCLIPModel
from modeling_geoclip.gallery_geoclip import (
    FaissGallery,
    Int8Scan,
    PQ4_SHORTLIST,
    PQ4Scan,
    exact_search,
    import_faiss,
    merge_top_k,
    resolve_gallery_options,
)
from geoloc.inference.tower_speed import cpu_supports_bf16, optimize_for_cpu


def median_time(function, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(functions: dict, repeats: int) -> dict:
    """Median wall seconds per function, timed round-robin (one warm-up each) so that load drift on a shared
    machine hits every contender alike."""
    return interleaved_wall_and_cpu(functions, repeats)[0]


def interleaved_wall_and_cpu(functions: dict, repeats: int, warm_up: bool = True) -> tuple[dict, dict]:
    """Median wall and CPU (process) seconds per function, timed round-robin. With one torch thread, CPU time
    is what a run costs on a core of its own: other jobs stretch the wall time, not the CPU time."""
    if warm_up:
        for function in functions.values():
            function()
    wall, cpu = {name: [] for name in functions}, {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            function()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    return ({name: statistics.median(values) for name, values in wall.items()},
            {name: statistics.median(values) for name, values in cpu.items()})


def index_megabytes(gallery: FaissGallery) -> float:
    """Serialised size of a FAISS index, written to a temporary file (no in-memory copy)."""
    with tempfile.NamedTemporaryFile() as handle:
        import_faiss().write_index(gallery.index, handle.name)
        return os.path.getsize(handle.name) / 2**20


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


RELEASED_PARTS = ("location_encoder.", "image_mlp.", "logit_scale")
PLACES = ["a street in Paris", "a beach in Brazil", "the Sahara desert", "snowy mountains in Nepal",
          "a rice field in Vietnam"]


def load_released_parts(model: GeoCLIPModel, weights: dict) -> GeoCLIPModel:
    """Load the released location encoder, image MLP and logit scale (official key names) into `model`."""
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(RELEASED_PARTS)}
    model.load_state_dict(convert_official_state_dict(weights, expected), strict=False)
    return model


def build_model(weights: dict) -> GeoCLIPModel:
    """Our GeoCLIP, ViT-L/14-shaped random tower + the released location encoder / MLP / logit scale."""
    torch.manual_seed(0)  # GeoCLIPConfig's default image tower is the official ViT-L/14 shape
    model = GeoCLIPModel(GeoCLIPConfig(use_text_tower=False, queue_size=0)).eval()
    return load_released_parts(model, weights)


def world_map_pixels(count: int, seed: int) -> torch.Tensor:
    """`count` world-map crops (224x224-pixel windows) and `count` random images, processed to (2c, 3, 224, 224)."""
    rng = np.random.default_rng(seed)
    crops = [render_crop(lat, lon, rng, window=224, size=224) for lat, lon in sample_points(count, rng)]
    noise = [np.asarray(rng.integers(0, 256, (224, 224, 3)), dtype=np.uint8) for _ in range(count)]
    return GeoCLIPImageProcessor()(images=crops + noise, return_tensors="pt")["pixel_values"]


def tower_options(model, pixels, skip_compile: bool) -> tuple[list[str], tuple]:
    """Markdown rows (median batch-1 ms, speed-up vs float32 eager timed alternately, min cosine vs float32
    eager on map crops / random images) per `optimize_for_cpu` option, and `(name, speed-up, model)` of the
    fastest."""
    options = {"fp32 eager (SDPA)": {}, "int8 dynamic": {"int8": True}, "channels-last": {"channels_last": True}}
    if cpu_supports_bf16():
        options["bf16"] = {"bf16": True}
    if not skip_compile:
        options["torch.compile"] = {"compile": True}
        options["int8 + torch.compile"] = {"int8": True, "compile": True}
    reference = model.get_clip_image_embeds(pixels).float()
    half = len(pixels) // 2
    rows, fastest = [], ("fp32 eager (SDPA)", 1.0, model)
    for name, kwargs in options.items():  # one optimised copy at a time, timed against fp32 eager
        optimized = optimize_for_cpu(copy.deepcopy(model), **kwargs) if kwargs else model
        cosine = F.cosine_similarity(optimized.get_clip_image_embeds(pixels).float(), reference, dim=-1)
        seconds = interleaved_medians({"fp32": lambda: model.get_clip_image_embeds(pixels[:1]),
                                       name: lambda m=optimized: m.get_clip_image_embeds(pixels[:1])}, repeats=5)
        speedup = seconds["fp32"] / seconds[name]
        rows.append(f"| {name} | {seconds[name] * 1000:.0f} | {speedup:.2f}x | {cosine[:half].min():.5f} | "
                    f"{cosine[half:].min():.5f} |")
        if speedup > fastest[1]:
            fastest = (name, speedup, optimized)
        del optimized
    return rows, fastest


def model_queries(weights: dict, seeds) -> dict[str, torch.Tensor]:
    """Normalised image queries (7 per seed: 5 world-map crops, 2 random-pixel images) and text queries (the
    5 `PLACES` per seed), each `(n, 512)`, through a converted GeoCLIP per seed: released parts, tiny random
    CLIP towers (`geoloc.configs.tiny_clip_configs`, projections widened to the MLP's 768)."""
    vision, text = tiny_clip_configs()
    vision.projection_dim = text.projection_dim = 768
    rng = np.random.default_rng(11)
    crops = [render_crop(lat, lon, rng, window=64, size=TINY_IMAGE_SIZE) for lat, lon in sample_points(5, rng)]
    noise = [rng.integers(0, 256, (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3), dtype=np.uint8) for _ in range(2)]
    size = {"shortest_edge": TINY_IMAGE_SIZE}, {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    pixels = GeoCLIPImageProcessor(size=size[0], crop_size=size[1])(images=crops + noise, return_tensors="pt")
    tokens = byte_level_clip_tokenizer()(PLACES, padding=True, return_tensors="pt")
    images, texts = [], []
    for seed in seeds:
        torch.manual_seed(seed)
        config = GeoCLIPConfig(vision_config=vision, text_config=text, queue_size=0)
        model = load_released_parts(GeoCLIPModel(config).eval(), weights)
        images.append(model.get_image_features(pixels["pixel_values"]))
        texts.append(model.get_text_features(tokens["input_ids"], tokens["attention_mask"]))
    return {"image": F.normalize(torch.cat(images), dim=-1), "text": F.normalize(torch.cat(texts), dim=-1)}


def queries_near(embeddings_of, rows: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centre = embeddings_of(rows)
    noise = torch.randn(centre.shape, generator=generator) / centre.shape[1] ** 0.5
    return F.normalize(centre + noise, dim=-1)


def recall_at(found: torch.Tensor, truth: torch.Tensor) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / truth.shape[1] for a, b in zip(found, truth)]))


def load_note() -> str:
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def per_image(official, fast_model, gallery: np.ndarray) -> tuple[float, float]:
    """Median seconds of the official `predict` and of our `geolocate` (processor included) on one image."""
    reference = official.GeoCLIP(from_pretrained=True, clip_pretrained=False).eval()
    fast_model.set_gallery(gallery)  # encoded once, stored with the model
    processor = GeoCLIPImageProcessor()
    with tempfile.TemporaryDirectory() as folder:
        image_path = str(Path(folder) / "crop.png")
        render_crop(48.85, 2.35, np.random.default_rng(1), window=224, size=224).save(image_path)
        timings = interleaved_medians({
            "theirs": lambda: reference.predict(image_path, top_k=5),
            "ours": lambda: fast_model.geolocate(
                pixel_values=processor(images=image_path, return_tensors="pt")["pixel_values"], top_k=5),
        }, repeats=3)
    return timings["theirs"], timings["ours"]


def exact_rows(embeddings: torch.Tensor, scale: torch.Tensor, queries: torch.Tensor) -> list[str]:
    """Exact search with float32 vs bfloat16 / float16 storage, batch 1, timed alternately; top-5 agreement."""
    stored = {name: embeddings.to(dtype) for name, dtype in
              (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16))}
    _, truth, _ = exact_search(queries, embeddings, scale, 5)
    seconds = interleaved_medians({name: lambda e=e: exact_search(queries[:1], e, scale, 5)
                                   for name, e in stored.items()}, repeats=5)
    rows = [f"| exact search, {len(embeddings) / 1e6:g}M points, float32 storage, batch 1 | "
            f"{seconds['float32'] * 1000:.0f} ms | reference | {load_note()} |"]
    for name in ("bfloat16", "float16"):
        same = recall_at(exact_search(queries, stored[name], scale, 5)[1], truth)
        rows.append(f"| exact search, {name} storage (`embedding_dtype`), batch 1 | {seconds[name] * 1000:.0f} ms, "
                    f"{seconds['float32'] / seconds[name]:.2f}x float32's speed | goal >= 1.00x | half the memory; "
                    f"top-5 shared with float32: {same:.3f} |")
    return rows


def exact_100k_rows(model, gallery: np.ndarray, queries: dict, held_out: dict) -> list[str]:
    """The official 100K gallery, exact search: float32 scan vs the first passes with exact re-scoring (int8, 64
    candidates: the default from 65,536 points; 4-bit PQ codes re-ranked on int8 copies, `scan='pq4'`), batch 1, timed
    alternately; how often the top-5 are the float32 search's, for image and text queries far from the gallery:
    `queries` (seeds 0-29, on which the pq4 shortlist was chosen) and `held_out` (seeds 200-259)."""
    start = time.perf_counter()
    embeddings = torch.cat([F.normalize(model.get_location_features(batch), dim=-1)
                            for batch in torch.from_numpy(gallery).split(16384)])
    print(f"encoded the official {len(embeddings):,}-point gallery in {time.perf_counter() - start:.0f} s", flush=True)
    scale = model.logit_scale.exp()
    scans, build_ms = {}, {}
    for name, build in (("int8", Int8Scan.build), ("pq4", PQ4Scan.build)):
        start = time.perf_counter()
        scans[name] = build(embeddings)
        build_ms[name] = (time.perf_counter() - start) * 1000
    agreement = {name: [] for name in scans}
    for label, query_set in (("seeds 0-29", queries), ("held-out seeds 200-259", held_out)):
        for name in ("image", "text"):
            batch = query_set[name]
            logits, rows, log_normaliser = exact_search(batch, embeddings, scale, 5)
            for kind, scan in scans.items():
                found = exact_search(batch, embeddings, scale, 5, scan=scan)  # 64 rows re-scored (default)
                same_rows = (found[1] == rows).all(1).float().mean().item()
                same = (found[0] - logits).abs() <= 1e-5 * logits.abs().clamp(min=1)
                same_logits = same.all(1).float().mean().item()
                agreement[kind].append(
                    f"{label}, {name} ({len(batch)}): top-5 rows identical {same_rows:.3f}, top-5 logits identical "
                    f"(ties: the official gallery repeats coordinates) **{same_logits:.3f}**, log-normaliser within "
                    f"{(found[2] - log_normaliser).abs().max().item():.4f}")
    probe = queries["image"][:1]
    wall, cpu = interleaved_wall_and_cpu({
        "float32": lambda: exact_search(probe, embeddings, scale, 5),
        **{kind: lambda scan=scan: exact_search(probe, embeddings, scale, 5, scan=scan)
           for kind, scan in scans.items()},
    }, repeats=45)
    rows = [
        f"| exact search, official 100K gallery, float32 scan, batch 1 | {wall['float32'] * 1000:.1f} ms wall, "
        f"{cpu['float32'] * 1000:.1f} ms CPU | reference | {len(embeddings) * embeddings.shape[1] * 4 / 1e6:.0f} MB "
        f"scanned; {load_note()} |"]
    labels = {"int8": "int8 first pass + exact re-scoring of 64 candidates (default, `scan='auto'`)",
              "pq4": f"4-bit PQ first pass, {PQ4_SHORTLIST:,} rows re-ranked on int8 copies, exact re-scoring of 64 "
                     f"(`scan='pq4'`)"}
    pq4_codes = scans["pq4"].index.ntotal * scans["pq4"].index.code_size
    sizes = {"int8": len(embeddings) * embeddings.shape[1], "pq4": pq4_codes + len(embeddings) * embeddings.shape[1]}
    scanned = {"int8": sizes["int8"], "pq4": pq4_codes}
    for kind in scans:
        rows.append(
            f"| same, {labels[kind]}, batch 1 | **{wall[kind] * 1000:.1f} ms wall, {cpu[kind] * 1000:.1f} ms CPU** "
            f"({wall['float32'] / wall[kind]:.1f}x / {cpu['float32'] / cpu[kind]:.1f}x) | <= 4 ms; top-5 identical on "
            f">= 99.5 % of far queries | {'; '.join(agreement[kind])}; first pass built in {build_ms[kind]:.0f} ms "
            f"({sizes[kind] / 1e6:.1f} MB of codes, {scanned[kind] / 1e6:.1f} MB scanned per query); {load_note()} |")
    return rows


def batch1_search(gallery: FaissGallery, embed, scale, queries: dict, truth: dict) -> tuple[dict, float, float]:
    """Recall@5 per query kind, and the median wall and CPU seconds of one batch-1 search over all queries (CPU
    time: what a search costs on a core of its own; wall time is stretched by other jobs on a loaded machine)."""
    recalls, seconds, cpu_seconds = {}, [], []
    for name, batch in queries.items():
        found = []
        for query in batch:
            start, cpu_start = time.perf_counter(), time.process_time()
            found.append(gallery.search(query[None], scale, 5, embed)[1])
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
        recalls[name] = recall_at(torch.cat(found), truth[name])
    return recalls, statistics.median(seconds), statistics.median(cpu_seconds)


def faiss_rows(embeddings: torch.Tensor, scale: torch.Tensor, queries: dict, calibration: torch.Tensor) -> list[str]:
    """The previous default index, today's default calibrated on the proxy, and the same index calibrated on
    image queries of other towers (`calibration`), on real encoded points; batch-1 searches."""
    size, dim = embeddings.shape

    def embed(rows):
        return embeddings[rows]

    truth = {name: exact_search(batch, embeddings, scale, 5)[1] for name, batch in queries.items()}
    kinds = f"{len(queries['image'])} image / {len(queries['text'])} text / {len(queries['near'])} near"

    def figures(gallery):
        recalls, seconds, cpu_seconds = batch1_search(gallery, embed, scale, queries, truth)
        return (f"recall@5 image **{recalls['image']:.3f}**, text **{recalls['text']:.3f}**, near "
                f"{recalls['near']:.3f}; **{cpu_seconds * 1000:.1f} ms CPU** ({seconds * 1000:.1f} ms wall) per query")

    lists = 2 ** round(math.log2(4 * math.sqrt(size)))
    previous = FaissGallery.build(embed, size, dim, resolve_gallery_options(  # the default until 2026-12-03
        "faiss", size, {"index": f"IVF{lists},SQ8,RFlat", "k_factor_rf": 4}, dim))
    rows = [f"| {size / 1e6:g}M-point gallery, previous FAISS default (`IVF{lists},SQ8,RFlat`, nprobe "
            f"{previous.options['nprobe']} calibrated on the proxy, 256 rows re-ranked), batch 1 | {figures(previous)} "
            f"| reference | {kinds} queries; {load_note()} |"]
    del previous
    options = resolve_gallery_options("faiss", size, {}, dim)
    start = time.perf_counter()
    gallery = FaissGallery.build(embed, size, dim, options)
    build_s = time.perf_counter() - start
    estimate = options["recall_estimate"]
    rows.append(f"| same, default options (`{options['index']}`, nprobe {options['nprobe']} calibrated on the "
                f"proxy), batch 1 | {figures(gallery)}; stored estimate {estimate['recall_at_5']:.3f} "
                f"({estimate['query_source']}) | >= 0.99, <= 40 ms | index {index_megabytes(gallery):.0f} MB, "
                f"built and calibrated in {build_s:.0f} s from encoded points; {load_note()} |")
    gallery.options = {**options, "nprobe": None, "target_recall": 0.99}  # real queries: no margin for a proxy
    calibration_truth = exact_search(calibration, embeddings, scale, 5)[1]
    gallery.calibrate(calibration, calibration_truth, embed, f"calibration_queries ({len(calibration)})")
    estimate = gallery.options["recall_estimate"]
    rows.append(f"| same index, nprobe {gallery.options['nprobe']} calibrated on {len(calibration)} image queries "
                f"of 15 other towers (`calibration_queries`, target_recall 0.99), batch 1 | {figures(gallery)}; "
                f"stored estimate {estimate['recall_at_5']:.3f} | >= 0.99, <= 40 ms | {load_note()} |")
    return rows


def synthetic_gallery_row(model, embeddings: torch.Tensor, size: int, queries: dict, index: str | None = None) -> str:
    """The default FAISS index (or `index`) on `size` synthetic embeddings derived from the real ones (see the
    row's note)."""
    scale, base = model.logit_scale.exp(), len(embeddings)

    def synthetic(rows: torch.Tensor) -> torch.Tensor:
        """Row r of the synthetic gallery: real embedding r % M moved 10% towards another real one."""
        partner = (rows * 2654435761) % (base - 1)
        own = embeddings[rows % base]
        return F.normalize(own + 0.1 * (embeddings[partner] - own), dim=-1)

    options = resolve_gallery_options("faiss", size, {"index": index} if index else {}, embeddings.shape[1])
    start = time.perf_counter()
    index = FaissGallery.build(synthetic, size, embeddings.shape[1], options, batch_size=65536)
    build_s = time.perf_counter() - start
    near = queries_near(synthetic, torch.randint(0, size, (100,), generator=torch.Generator().manual_seed(5)), seed=6)
    queries = {"near": near, "image": queries["image"], "text": queries["text"]}
    best = {name: (batch.new_empty(len(batch), 0), torch.empty(len(batch), 0, dtype=torch.long))
            for name, batch in queries.items()}
    for chunk in torch.arange(size).split(131_072):  # exact reference, chunk by chunk
        vectors = synthetic(chunk)
        for name, batch in queries.items():
            logits, indices, _ = exact_search(batch, vectors, scale, 5)
            best[name] = merge_top_k(best[name], (logits, indices + chunk[0]), 5)
    recalls, seconds, cpu_seconds = batch1_search(index, synthetic, scale, queries, {k: v[1] for k, v in best.items()})
    gigabytes = index_megabytes(index) / 2**10 + (size * 8 + index.sample.embeddings.nbytes) / 2**30
    # The synthetic rows have no coordinates to re-encode: the search re-scores them with `synthetic`, and what
    # re-encoding the same number of real candidates costs is timed apart and added.
    rescore_ms = 0.0
    if options["rescore"]:
        candidates = torch.from_numpy(sample_points(options["n_candidates"], np.random.default_rng(7)))
        rescore_ms = 1000 * median_time(lambda: model.get_location_features(candidates), repeats=5)
    return (f"| {size / 1e6:g}M-point gallery, top-5, batch 1 (`{options['index']}`, nprobe {options['nprobe']} "
            f"calibrated, {options['n_candidates']} candidates re-scored) | **{cpu_seconds * 1000 + rescore_ms:.1f} ms "
            f"CPU** ({seconds * 1000 + rescore_ms:.1f} ms wall) per query: search {cpu_seconds * 1000:.1f} ms CPU "
            f"({seconds * 1000:.1f} wall) + re-encoding the candidates {rescore_ms:.1f} ms; recall@5 image "
            f"**{recalls['image']:.3f}**, text **{recalls['text']:.3f}**, near {recalls['near']:.3f}, stored estimate "
            f"{options['recall_estimate']['recall_at_5']:.3f}; index + "
            f"coordinates + sample **{gigabytes:.2f} GB**; built in {build_s:.0f} s | recall@5 >= 0.95, <= 100 ms | "
            f"SYNTHETIC embeddings: each real embedding plus copies moved 10% towards another random real one "
            f"(not encoded points); {load_note()} |")


def encoding_row(official, model, locations: torch.Tensor) -> str:
    """Location encoding throughput, ours vs the official encoder on the same 50K points, timed alternately
    (the bit-for-bit comparison is the warm-up)."""
    encoder, probe = official.LocationEncoder(from_pretrained=True).eval(), locations[:50_000].float()
    same = torch.equal(encoder(probe), torch.cat([model.get_location_features(batch) for batch in probe.split(16384)]))
    wall, cpu = interleaved_wall_and_cpu({
        "theirs": lambda: encoder(probe),
        "ours": lambda: [model.get_location_features(batch) for batch in probe.split(16384)],
    }, repeats=5, warm_up=False)
    return (f"| gallery encoding throughput | {len(probe) / wall['ours']:,.0f} points/s wall, "
            f"**{wall['theirs'] / wall['ours']:.2f}x** the official code; per CPU second "
            f"{len(probe) / cpu['ours']:,.0f}, **{cpu['theirs'] / cpu['ours']:.2f}x** | official "
            f"{len(probe) / wall['theirs']:,.0f} points/s wall, {len(probe) / cpu['theirs']:,.0f} per CPU second; "
            f"goal >= 1.00x | same 50K points, float32, medians of 5 alternate runs; outputs bit-identical: {same}; "
            f"{load_note()} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000, help="real encoded gallery size")
    parser.add_argument("--synthetic", type=int, default=10_000_000, help="synthetic gallery size (0: skip)")
    parser.add_argument("--synthetic-index", default=None,
                        help="FAISS factory string for the synthetic gallery (default: the default index for its size)")
    parser.add_argument("--queries", type=int, default=100, help="near-gallery queries")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-towers", action="store_true", help="skip the ViT-L/14 tower and per-image rows")
    parser.add_argument("--synthetic-only", action="store_true",
                        help="only the synthetic gallery's row (the real points are still encoded: it is built "
                             "from them)")
    parser.add_argument("--exact-100k-only", action="store_true",
                        help="only the exact-search rows over the official 100K gallery (float32 vs the first passes)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    set_threads()
    keep_freed_memory()  # as the geoloc CLI does (process-wide: the official side too)
    wheel = fetch_official_wheel()
    official = load_official_geoclip(wheel)
    weights, metadata = read_official_geoclip(wheel)
    model = build_model(weights)
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, bf16 kernels: {cpu_supports_bf16()}, {load_note()}",
          flush=True)
    rows = []
    if args.exact_100k_only:
        rows = exact_100k_rows(model, np.asarray(metadata["gallery"], dtype=np.float64),
                               model_queries(weights, range(30)), model_queries(weights, range(200, 260)))
        print("\n| what | ours | goal / reference | notes |\n|---|---|---|---|\n" + "\n".join(rows))
        return
    if not args.skip_towers and not args.synthetic_only:
        tower_rows, (fastest, _, fast_model) = tower_options(model, world_map_pixels(4, seed=0), args.skip_compile)
        print("\n| image tower option (ViT-L/14, batch 1) | ms | speed-up | min cos, map crops | min cos, random |")
        print("|---|---|---|---|---|")
        print("\n".join(tower_rows), flush=True)
        theirs_s, ours_s = per_image(official, fast_model, np.asarray(metadata["gallery"], dtype=np.float64))
        del fast_model
        rows.append(f"| per-image geolocate vs official `predict`, ViT-L/14 shape | {ours_s:.3f} s ({fastest} tower, "
                    f"stored 100K gallery, exact) | official {theirs_s:.2f} s: **{theirs_s / ours_s:.0f}x faster** "
                    f"(goal >= 25x) | random ViT-L/14 weights; processor included; timed alternately |")

    locations = torch.from_numpy(sample_points(args.points, np.random.default_rng(2), land_fraction=0.7))
    if not args.synthetic_only:
        rows.append(encoding_row(official, model, locations))
        print(rows[-1], flush=True)
    start = time.perf_counter()
    embeddings = torch.cat([F.normalize(model.get_location_features(b), dim=-1) for b in locations.split(16384)])
    print(f"encoded {len(locations):,} points in {time.perf_counter() - start:.0f} s", flush=True)
    queries = model_queries(weights, range(30))
    queries["near"] = queries_near(
        lambda r: embeddings[r],
        torch.randint(0, len(embeddings), (args.queries,), generator=torch.Generator().manual_seed(3)), seed=4)
    scale = model.logit_scale.exp()
    if not args.synthetic_only:
        rows += exact_100k_rows(model, np.asarray(metadata["gallery"], dtype=np.float64), queries,
                                model_queries(weights, range(200, 260)))
        print("\n".join(rows[-3:]), flush=True)
        rows += exact_rows(embeddings, scale, queries["image"][:50])
        print("\n".join(rows[-3:]), flush=True)
        rows += faiss_rows(embeddings, scale, queries, model_queries(weights, range(100, 115))["image"])
        print("\n".join(rows[-3:]), flush=True)
    if args.synthetic:
        rows.append(synthetic_gallery_row(model, embeddings, args.synthetic, queries, args.synthetic_index))
    print("\n| what | ours | goal / reference | notes |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    print(f"\npeak RSS {peak_rss_gb():.1f} GB; timings are medians on a shared 2-core CPU (noisy).")


if __name__ == "__main__":
    main()
