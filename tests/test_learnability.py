"""Short CPU runs of tiny GeoCLIP and tiny GeoHier on world-map crops are both clearly better than chance."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_learnability import run  # noqa: E402


def test_tiny_models_beat_chance_on_world_map_crops(tmp_path):
    mean, random_point, *models = run(1000, 200, str(tmp_path), geoclip_steps=300, geohier_steps=600,
                                      geocell_levels="5:50,5:20,4:10")
    best_chance = {metric: max(mean[1][metric], random_point[1][metric]) for metric in ("acc_2500km", "acc_750km")}
    for name, metrics, _ in models:
        assert metrics["acc_2500km"] >= 2 * best_chance["acc_2500km"] + 0.05, (name, metrics, mean, random_point)
        assert metrics["acc_750km"] > best_chance["acc_750km"] + 0.03, (name, metrics, mean, random_point)
