"""Short CPU runs of the README's training command (tiny recipes, fewer steps, one process) on world-map crops
beat a plain pixel lookup of the training crops (1-NN on raw pixels, L2 or cosine, whichever is better) on a
validation split, each model in its own output space (GeoHier: the lookup snapped to its finest cells). The full
comparison, with the stronger pooled and shift-tolerant lookups, several seeds and a spatially buffered split,
is `benchmarks/bench_learnability.py` (an hour of CPU: a benchmark, not a test)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_learnability import median_km, run  # noqa: E402

PLAIN_LOOKUPS = ("1-NN raw pixels (L2)", "1-NN raw pixels (cosine)")


def test_tiny_models_beat_a_plain_pixel_lookup_on_validation_crops(tmp_path):
    rows = run(1000, 200, 20, str(tmp_path), processes=1, seeds=(0,), train_args=("--max-steps", "1000"))
    names = [row["name"] for row in rows]
    for model, snapped in (("geoclip", False), ("geohier", True)):
        trained = next(row for row in rows if row.get("model") == model)
        lookups = [row for row in rows if row["name"].startswith(PLAIN_LOOKUPS) and ("snapped" in row["name"]) == snapped]
        assert len(lookups) == 2, names
        best_lookup = min(median_km(row, "validation") for row in lookups)
        chance = median_km(next(row for row in rows if row["name"] == "chance: training mean"), "validation")
        assert median_km(trained, "validation") < 0.9 * best_lookup < chance, (model, best_lookup, rows)
