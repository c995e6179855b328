"""Training throughput of tiny GeoCLIP on raw images vs on cached CLIP image features (CPU), on a quiet machine
and under a concurrent CPU load, with default settings and with one torch thread per core forced.

The raw path decodes, preprocesses and runs the frozen CLIP tower on every batch; `--cache-features`
computes the tower's embeddings once (`Dataset.map`, cached on disk) and trains the MLP and location encoder
on them. Every run is `geoloc train` in a fresh process (so the dispatcher picks its torch threads at start,
as for a user; `geoloc.threads.pick_threads`); samples/s are measured by `geoloc.training.train` itself (last
`log.jsonl` record, which excludes setup and the one-off feature caching; the caching time is printed
separately). The load is one busy-loop process per core, started `--load-warmup` seconds before the loaded
runs. "Quiet" means no load of ours; the other busy threads the picker saw (`geoloc.threads.busy_threads`) and
the machine's load average are printed beside every figure.

    python benchmarks/bench_train_cached.py [--train 2000 --steps 200 --batch-size 64 --load-warmup 2]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geoloc.threads import available_cores, busy_threads, pick_threads
from geoloc.data.worldmap import build_worldmap_splits, write_imagefolder

BUSY_LOOP = "while True: pass"


def train(arguments: list[str], output_dir: str, threads: int | None) -> str:
    """Run `geoloc [--threads N] train ARGUMENTS --output-dir OUTPUT_DIR` in a fresh process without
    OMP_NUM_THREADS (the default settings); return the conditions at start (busy threads, load, torch threads)."""
    environment = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    conditions = (f"{busy_threads():.0f} other busy threads, load average {os.getloadavg()[0]:.1f}, "
                  f"{pick_threads(threads, environ=environment)} torch threads")
    dispatcher = ["--threads", str(threads)] if threads else []
    command = [sys.executable, "-m", "geoloc.cli", *dispatcher, "train", *arguments, "--output-dir", output_dir]
    result = subprocess.run(command, env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return conditions


def samples_per_second(output_dir: str) -> float:
    with open(os.path.join(output_dir, "log.jsonl")) as handle:
        return json.loads(handle.read().splitlines()[-1])["samples_per_second"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--load-warmup", type=float, default=2.0,
                        help="seconds the busy loops run before the loaded runs (default: 2)")
    args = parser.parse_args(argv)
    cores = available_cores()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = os.path.join(scratch, "data")
        write_imagefolder(build_worldmap_splits(args.train, 0), data_dir)
        # A frozen tower without image augmentation on both paths: what feature caching requires.
        common = ["--model", "geoclip", "--model-config", "tiny", "--no-train-backbone", "--augmentation", "none",
                  "--dataset", data_dir, "--max-steps",
                  str(args.steps), "--batch-size", str(args.batch_size), "--log-every", str(args.steps),
                  "--checkpoint-every", str(10 * args.steps)]
        cache = ["--cache-features", "--cache-dir", os.path.join(scratch, "features")]
        started = time.perf_counter()
        train([*common, *cache, "--max-steps", "1"], os.path.join(scratch, "cached-first"), None)
        caching_seconds = time.perf_counter() - started
        inputs = {"raw images": common, "cached features": [*common, *cache]}

        def measure(condition: str) -> None:
            for threads in (None, cores):  # default pick, then torch's own default (one per core)
                for name, arguments in inputs.items():
                    output = os.path.join(scratch, f"{name}-{condition}-{threads}".replace(" ", "-"))
                    note = train(arguments, output, threads)
                    rows.append((name, condition, "default (picked at start)" if threads is None else
                                 f"{threads} (one per core, forced)", samples_per_second(output), note))
                    cells = (f"{cell:.0f}" if isinstance(cell, float) else cell for cell in rows[-1])
                    print("| " + " | ".join(cells) + " |", flush=True)

        measure("quiet")
        loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(cores)]
        try:
            time.sleep(args.load_warmup)
            measure(f"{cores} busy-loop processes")
        finally:
            for loop in loops:
                loop.kill()
                loop.wait()
    print(f"\nTiny GeoCLIP training, {args.train} world-map crops, batch {args.batch_size}, {args.steps} steps, "
          f"{cores} cores:\n")
    print("| input | machine | torch threads | samples/s | conditions at start |\n|---|---|---|---|---|")
    for name, condition, threads, samples, note in rows:
        print(f"| {name} | {condition} | {threads} | {samples:.0f} | {note} |")
    by_key = {(name, condition, threads): samples for name, condition, threads, samples, _ in rows}
    print("\nCached vs raw, same machine and threads: " + "; ".join(
        f"{condition}, {threads}: {by_key['cached features', condition, threads] / samples:.1f}x"
        for name, condition, threads, samples, _ in rows if name == "raw images"))
    print(f"One-off feature caching run (incl. setup): {caching_seconds:.1f} s")


if __name__ == "__main__":
    main()
