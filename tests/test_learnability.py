"""Short CPU runs of the README's training command (tiny recipes, fewer steps, one process) on world-map crops
are clearly better than chance for both models. The full proof against the 1-NN pixel baselines is
`benchmarks/bench_learnability.py` (minutes of CPU: a benchmark, not a test)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_learnability import run  # noqa: E402


def test_tiny_models_beat_chance_on_world_map_crops(tmp_path):
    rows = dict((name, metrics) for name, metrics, _ in run(
        800, 200, str(tmp_path), processes=1, train_args=("--max-steps", "250")))
    chance = {metric: max(rows["chance: training mean"][metric], rows["chance: random training location"][metric])
              for metric in ("acc_2500km", "acc_750km")}
    models = {name: metrics for name, metrics in rows.items() if name.startswith("tiny")}
    assert len(models) == 2, rows.keys()
    for name, metrics in models.items():
        assert metrics["acc_2500km"] >= 2 * chance["acc_2500km"] + 0.05, (name, metrics, chance)
        assert metrics["acc_750km"] > chance["acc_750km"] + 0.05, (name, metrics, chance)
