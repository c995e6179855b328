"""Training throughput of tiny GeoCLIP on raw images vs on cached CLIP image features (CPU, one run each).

The raw path decodes, preprocesses and runs the frozen CLIP tower on every batch; `--cache-features`
computes the tower's embeddings once (`Dataset.map`, cached on disk) and trains the MLP and location encoder
on them. Samples/s are measured by `geoloc.train` itself (last `log.jsonl` record, which excludes setup
and the one-off feature caching; the caching time is printed separately).

    python benchmarks/bench_train_cached.py [--train 2000 --steps 200 --batch-size 64]
"""

import argparse
import json
import os
import tempfile
import time

from geoloc import train
from geoloc.worldmap import build_worldmap_splits, write_imagefolder


def samples_per_second(output_dir: str) -> float:
    with open(os.path.join(output_dir, "log.jsonl")) as handle:
        return json.loads(handle.read().splitlines()[-1])["samples_per_second"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = os.path.join(scratch, "data")
        write_imagefolder(build_worldmap_splits(args.train, 0), data_dir)
        common = ["--model", "geoclip", "--model-config", "tiny", "--dataset", data_dir, "--max-steps",
                  str(args.steps), "--batch-size", str(args.batch_size), "--log-every", str(args.steps),
                  "--checkpoint-every", str(10 * args.steps)]
        train.main([*common, "--output-dir", os.path.join(scratch, "raw")])
        raw = samples_per_second(os.path.join(scratch, "raw"))
        cache = ["--cache-features", "--cache-dir", os.path.join(scratch, "features")]
        started = time.perf_counter()
        train.main([*common, *cache, "--output-dir", os.path.join(scratch, "cached-first"), "--max-steps", "1"])
        caching_seconds = time.perf_counter() - started
        train.main([*common, *cache, "--output-dir", os.path.join(scratch, "cached")])
        cached = samples_per_second(os.path.join(scratch, "cached"))
    print(f"\nTiny GeoCLIP training, {args.train} world-map crops, batch {args.batch_size}, {args.steps} steps, CPU:\n")
    print("| input | samples/s |\n|---|---|")
    print(f"| raw images (decode + preprocess + frozen CLIP tower per batch) | {raw:.0f} |")
    print(f"| cached CLIP features (`--cache-features`) | {cached:.0f} |")
    print(f"\nSpeed-up: {cached / raw:.1f}x (one-off feature caching run, incl. setup: {caching_seconds:.1f} s)")


if __name__ == "__main__":
    main()
