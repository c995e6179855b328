"""Freed memory kept in the process (`geoloc.allocator.keep_freed_memory`, as `geoloc predict` does) against
glibc's own thresholds: the ViT-L/14-shaped image tower (random weights), per image at batch 1 and 8, each side in
fresh processes taken alternately (one process cannot go back to glibc's growing threshold once it is set).

    python benchmarks/bench_allocator.py [--towers int8 fp32] [--processes 2]

Prints a markdown table: median seconds per image of each side and the ratio, with the load average.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from geoloc.inference.tower_speed import TOWER_CHOICES

# One process: build the tower, time it per batch size (one warm-up call, then `calls` calls), print JSON.
TIMING = """
import json, sys, time, statistics, warnings, torch
warnings.filterwarnings("ignore")
from geoloc.allocator import keep_freed_memory
from geoloc.threads import set_threads
if sys.argv[1] == "kept":
    assert keep_freed_memory()
set_threads()
torch.set_grad_enabled(False)
from modeling_geoclip import GeoCLIPConfig, GeoCLIPModel
from geoloc.inference.tower_speed import apply_tower
torch.manual_seed(0)  # GeoCLIPConfig's default image tower is the official ViT-L/14 shape
model = apply_tower(GeoCLIPModel(GeoCLIPConfig(use_text_tower=False, queue_size=0)).eval(), sys.argv[2])
found = {}
for batch in (1, 8):
    pixels = torch.randn(batch, 3, 224, 224)
    model.get_clip_image_embeds(pixels)
    times = []
    for _ in range(int(sys.argv[3])):
        start = time.perf_counter()
        model.get_clip_image_embeds(pixels)
        times.append((time.perf_counter() - start) / batch)
    found[batch] = statistics.median(times)
print(json.dumps(found))
"""


def run(mode: str, tower: str, calls: int) -> dict:
    done = subprocess.run([sys.executable, "-c", TIMING, mode, tower, str(calls)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        raise SystemExit(f"bench_allocator: the {mode} {tower} process failed: {done.stderr.strip().splitlines()[-1]}")
    return {int(batch): seconds for batch, seconds in json.loads(done.stdout.splitlines()[-1]).items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--towers", nargs="+", choices=TOWER_CHOICES, default=["int8", "fp32"])
    parser.add_argument("--processes", type=int, default=2, help="fresh processes per side and tower")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per batch size in each process")
    args = parser.parse_args(argv)
    print(f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    rows = []
    for tower in args.towers:
        times = {"default": [], "kept": []}
        for index in range(args.processes):
            for mode in ("default", "kept"):  # alternately: load drift hits both sides alike
                times[mode].append(run(mode, tower, args.calls))
                print(f"{tower} {mode} process {index + 1}: {times[mode][-1]}", flush=True)
        for batch in (1, 8):
            default = statistics.median(found[batch] for found in times["default"])
            kept = statistics.median(found[batch] for found in times["kept"])
            rows.append(f"| {tower} | {batch} | {default:.3f} s | {kept:.3f} s | {default / kept:.2f}x | "
                        f"{os.getloadavg()[0]:.1f} |")
    print("\n| tower | batch | glibc's thresholds | freed memory kept | speed-up | load |\n|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
