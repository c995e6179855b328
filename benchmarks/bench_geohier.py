"""GeoHier CPU speed: images/s of `geolocate` for the tiny and the paper-size config next to GeoCLIP on the same
ViT-B/16-shaped backbone (random weights), and the geocell build time. Prints a markdown table.

    python benchmarks/bench_geohier.py [--batch-size 8] [--points 1000000 4700000]
"""

import argparse
import time

import numpy as np
import torch
from transformers import CLIPVisionConfig

from geoloc.models import register_models
from geoloc.configs import TINY_IMAGE_SIZE, tiny_geohier_config
from geoloc.geography.geocells import build_geocells, leaf_cell_ids
from modeling_geoclip import GeoCLIPConfig, GeoCLIPModel
from modeling_geohier import GeoHierConfig, GeoHierModel

register_models()  # the Auto classes below read GeoCLIP and GeoHier checkpoints

VIT_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
               image_size=224)


def random_cell_table(cells_per_level):
    """Cells with valid parents (cell i of a level under cell i * n_above // n of the level above)."""
    rng = np.random.default_rng(0)
    table = []
    for level, n in enumerate(cells_per_level):
        above = cells_per_level[level - 1] if level else 0
        table.append({
            "tokens": [format((i << 20) | (1 << 19), "x").rstrip("0") for i in range(1, n + 1)],
            "latitudes": rng.uniform(-80, 80, n), "longitudes": rng.uniform(-180, 180, n),
            "parents": np.arange(n) * above // n if level else np.full(n, -1), "counts": np.ones(n, dtype=np.int64),
        })
    return table


def images_per_second(model, image_size: int, batch_size: int, repeats: int) -> float:
    pixel_values = torch.randn(batch_size, 3, image_size, image_size)
    with torch.inference_mode():
        model.geolocate(pixel_values=pixel_values, top_k=5)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            model.geolocate(pixel_values=pixel_values, top_k=5)
    return batch_size * repeats / (time.perf_counter() - start)


def geohier(config: GeoHierConfig) -> GeoHierModel:
    model = GeoHierModel(config).eval()
    model.set_cell_table(random_cell_table(config.cells_per_level))
    return model


def geoclip_vit_b16(gallery_size: int) -> GeoCLIPModel:
    vision = CLIPVisionConfig(**VIT_B16, projection_dim=512)
    model = GeoCLIPModel(GeoCLIPConfig(vision_config=vision, use_text_tower=False)).eval()
    rng = np.random.default_rng(0)
    model.set_gallery(np.stack([rng.uniform(-80, 80, gallery_size), rng.uniform(-180, 180, gallery_size)], 1))
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gallery-size", type=int, default=100_000, help="GeoCLIP gallery (official: 100k)")
    parser.add_argument("--points", type=int, nargs="+", default=[1_000_000], help="geocell build sizes")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    tiny = geohier(tiny_geohier_config())
    rows.append(("GeoHier tiny (tiny CLIP, 4x3 queries, 8/16/32 cells)", "images/s",
                 images_per_second(tiny, TINY_IMAGE_SIZE, 64, 10 * args.repeats)))
    paper = geohier(GeoHierConfig(vision_config=CLIPVisionConfig(**VIT_B16)))
    rows.append(("GeoHier paper size (ViT-B/16, 16x3 queries, 3298/7202/12893 cells, N=6, E=2)", "images/s",
                 images_per_second(paper, 224, args.batch_size, args.repeats)))
    del paper
    geoclip = geoclip_vit_b16(args.gallery_size)
    rows.append((f"GeoCLIP, same ViT-B/16 backbone, {args.gallery_size} gallery", "images/s",
                 images_per_second(geoclip, 224, args.batch_size, args.repeats)))
    del geoclip
    rng = np.random.default_rng(0)
    for n in args.points:
        centres = rng.uniform([-60, -180], [70, 180], (2000, 2))
        which = rng.integers(0, len(centres), n)
        latitudes = np.clip(centres[which, 0] + rng.normal(0, 1, n), -90, 90)
        longitudes = (centres[which, 1] + rng.normal(0, 1, n) + 180) % 360 - 180
        start = time.perf_counter()
        leaf_cell_ids(latitudes, longitudes)
        leaves = time.perf_counter() - start
        start = time.perf_counter()
        cells, _ = build_geocells(latitudes, longitudes)
        total = time.perf_counter() - start
        sizes = "/".join(str(len(level["tokens"])) for level in cells)
        rows.append((f"build_geocells, {n:,} clustered points, tau (50,5000/2000/1000) -> {sizes} cells", "s", total))
        rows.append((f"  of which S2 leaf ids (s2geometry, {n:,} points)", "s", leaves))
    print(f"CPU: {torch.get_num_threads()} torch threads (shared machine: numbers are indicative)\n")
    print("| benchmark | unit | value |\n|---|---|---|")
    for name, unit, value in rows:
        print(f"| {name} | {unit} | {value:.2f} |")


if __name__ == "__main__":
    main()
