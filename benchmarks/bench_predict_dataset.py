"""Batch geolocation throughput: `geoloc predict --dataset` images/s, as a user runs it, on 1 and 2 processes,
with and without decoding ahead (`--decode-workers`), for the bundled tiny GeoCLIP and a ViT-L/14-shaped one.

The photos are generated camera-like JPEGs (a sky gradient over textured ground, `--width`x`--height`, quality
90), so decoding costs what it costs for a photo archive. Each run is the real command in a fresh process
(`python -m geoloc predict --dataset ...`, or `accelerate launch` with 2 CPU processes), timed end to end: model
loading is included, so small runs understate the steady rate. The ViT-L/14-shaped model has random weights (fine for speed) and the official GPS encoder's
width; it is saved once to a temporary folder. Answers are checked to be the same in every run.

    python benchmarks/bench_predict_dataset.py [--images 192] [--vit-images 12] [--skip-vit]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def photos(folder: Path, count: int, width: int, height: int) -> Path:
    """`count` camera-like JPEGs in `folder` (no metadata: predict needs none)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = np.arange(height)[:, None, None]
    for index in range(count):
        horizon = int(rng.integers(height // 3, 2 * height // 3))
        sky, ground = rng.uniform(120, 255, 3), rng.uniform(30, 150, 3)
        base = np.where(rows < horizon, sky * (1 - 0.3 * rows / height), ground)
        pixels = np.broadcast_to(base, (height, width, 3)) + rng.normal(0, 14, (height, width, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"photo{index:05d}.jpg", quality=90)
    return folder


def vit_l14_model(folder: Path) -> Path:
    """A GeoCLIP with a random ViT-L/14 image tower (224 px) and a 512-wide GPS encoder, saved to `folder`."""
    import torch
    from transformers import CLIPTextConfig

    from geoloc.configs import byte_level_clip_tokenizer
    from modeling_geoclip import GeoCLIPConfig, GeoCLIPImageProcessor, GeoCLIPModel

    text = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                          projection_dim=768, vocab_size=262, max_position_embeddings=77)
    torch.manual_seed(0)
    model = GeoCLIPModel(GeoCLIPConfig(text_config=text, queue_size=0)).eval()  # default tower: ViT-L/14
    gallery = np.random.default_rng(0).uniform([-90, -180], [90, 180], size=(100_000, 2))
    model.set_gallery(gallery)
    model.save_pretrained(folder)
    GeoCLIPImageProcessor().save_pretrained(folder)
    byte_level_clip_tokenizer().save_pretrained(folder)
    return folder


def run(model: str, data: Path, output: Path, processes: int, workers: int, batch_size: int) -> float:
    """Seconds of one `predict --dataset` run in fresh processes (loading included)."""
    command = ["-m", "geoloc", "predict", "--dataset", str(data), "--model", model, "--output", str(output),
               "--top-k", "5", "--batch-size", str(batch_size), "--decode-workers", str(workers)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(output.parent / "cache")}
    if processes > 1:
        environment.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // processes)))
        command = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "-m", "geoloc.inference.predict", *command[3:]]
    start = time.perf_counter()
    subprocess.run([sys.executable, *command], check=True, env=environment, cwd=REPO, capture_output=True, text=True)
    return time.perf_counter() - start


def table(name: str, model: str, data: Path, count: int, work: Path, batch_size: int) -> list[str]:
    rows, reference = [], None
    for processes in (1, 2):
        for workers in (0, 2):
            output = work / f"{name}-{processes}-{workers}.parquet"
            load = os.getloadavg()[0]
            seconds = run(model, data, output, processes, workers, batch_size)
            frame = pd.read_parquet(output)[["id", "rank", "latitude", "longitude"]]
            same = reference is None or frame.equals(reference)
            reference = frame if reference is None else reference
            rows.append(f"| {name} | {processes} | {workers} | {count} | {seconds:.1f} s | **{count / seconds:.1f}** | "
                        f"{'same' if same else 'DIFFERENT'} | {load:.1f} |")
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=int, default=192, help="photos for the tiny model")
    parser.add_argument("--vit-images", type=int, default=12, help="photos for the ViT-L/14-shaped model")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1200)
    parser.add_argument("--skip-vit", action="store_true", help="only the tiny model")
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start; photos "
          f"{args.width}x{args.height} JPEG", flush=True)
    header = ("| model | processes | decode workers | images | wall (loading included) | images/s | answers vs "
              "first row | load at start |\n|---|---|---|---|---|---|---|---|")
    print(header, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        data = photos(work / "photos", max(args.images, args.vit_images), args.width, args.height)
        rows += table("tiny GeoCLIP (bundled, 32 px)", "default", data, max(args.images, args.vit_images), work, 32)
        if not args.skip_vit:
            subset = work / "vit-photos"
            subset.mkdir()
            for path in sorted(data.iterdir())[: args.vit_images]:
                shutil.copy(path, subset / path.name)  # a copy: links out of a dataset folder are refused
            started = time.perf_counter()
            model = vit_l14_model(work / "vit-l14")
            print(f"(ViT-L/14-shaped model built and saved in {time.perf_counter() - started:.0f} s)", flush=True)
            rows += table("GeoCLIP ViT-L/14 shape (random)", str(model), subset, args.vit_images, work, 8)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end\n\n{header}\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
