"""A short CPU run of tiny GeoCLIP on world-map crops is clearly better than chance."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_learnability import run  # noqa: E402


def test_tiny_geoclip_beats_chance_on_world_map_crops(tmp_path):
    mean, random_point, geoclip = run(600, 150, str(tmp_path), geoclip_steps=300, geohier_steps=0,
                                      models=("geoclip",))
    best_chance = max(mean[1]["acc_2500km"], random_point[1]["acc_2500km"])
    assert geoclip[1]["acc_2500km"] >= 2 * best_chance + 0.05, (geoclip, mean, random_point)
    assert geoclip[1]["acc_750km"] > max(mean[1]["acc_750km"], random_point[1]["acc_750km"]) + 0.03
