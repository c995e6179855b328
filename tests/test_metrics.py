"""The metric function and its `evaluate` module: known values, thresholds, errors, round trip."""

from pathlib import Path

import evaluate
import numpy as np
import pytest

import geoloc.inference.metrics
from geoloc.inference.metrics import distance_metrics, geolocation_metrics

METRIC_DIR = Path(geoloc.inference.metrics.__file__).parent / "geolocation"
KEYS = ["acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km", "mean_km", "median_km", "geoscore"]


def test_known_values():
    # errors: 0 km (exact), 343.92 km (Paris for London), 5585.23 km (London for New York), 20003.93 km
    pred_lat, pred_lon = [10.0, 48.8566, 51.5074, 0.0], [20.0, 2.3522, -0.1278, 0.0]
    ref_lat, ref_lon = [10.0, 51.5074, 40.7128, 0.0], [20.0, -0.1278, -74.0060, 180.0]
    metrics = geolocation_metrics(pred_lat, pred_lon, ref_lat, ref_lon)
    assert list(metrics) == KEYS
    assert metrics["acc_1km"] == metrics["acc_25km"] == metrics["acc_200km"] == 0.25
    assert metrics["acc_750km"] == metrics["acc_2500km"] == 0.5
    errors = np.array([0.0, 343.923, 5585.234, 20003.931])
    assert metrics["mean_km"] == pytest.approx(errors.mean(), abs=1e-2)
    assert metrics["median_km"] == pytest.approx((343.923 + 5585.234) / 2, abs=1e-2)
    assert metrics["geoscore"] == pytest.approx(np.mean(5000 * np.exp(-errors / 1492.7)), abs=1e-2)


def test_threshold_is_inclusive_and_keys_follow_thresholds():
    assert distance_metrics([0.0, 10.0, 10.5], thresholds_km=(10, 0.5)) == pytest.approx({
        "acc_10km": 2 / 3, "acc_0.5km": 1 / 3, "mean_km": 20.5 / 3, "median_km": 10.0,
        "geoscore": np.mean(5000 * np.exp(-np.array([0.0, 10.0, 10.5]) / 1492.7)),
    })
    assert distance_metrics([0.0])["geoscore"] == 5000.0


@pytest.mark.parametrize(("args", "message"), [
    (([], [], [], []), "0 distances"),
    (([91.0], [0.0], [0.0], [0.0]), r"predictions\[0\] = \(91.0, 0.0\)"),
    (([0.0], [0.0], [0.0], [float("nan")]), r"references\[0\].*finite"),
    (([0.0, 1.0], [0.0, 1.0], [0.0], [0.0]), "2 predictions but 1 references"),
])
def test_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        geolocation_metrics(*args)


@pytest.mark.parametrize("thresholds", [(), (0,), (-5,), (float("inf"),), ("25",), (25, 25.0)])
def test_rejects_bad_thresholds(thresholds):
    with pytest.raises(ValueError, match="thresholds_km"):
        geolocation_metrics([0.0], [0.0], [0.0], [0.0], thresholds_km=thresholds)


def test_distance_metrics_rejects_negative_distances():
    with pytest.raises(ValueError, match=r"distances_km\[1\] = -1.0"):
        distance_metrics([1.0, -1.0])


def test_evaluate_module_round_trip():
    rng = np.random.default_rng(0)
    pred = np.column_stack([rng.uniform(-90, 90, 50), rng.uniform(-180, 180, 50)])
    ref = pred + rng.normal(0, 2, pred.shape)
    ref[:, 0] = ref[:, 0].clip(-90, 90)
    ref[:, 1] = ref[:, 1].clip(-180, 180)
    metric = evaluate.load(str(METRIC_DIR))
    result = metric.compute(predictions=pred.tolist(), references=ref.tolist())
    expected = geolocation_metrics(pred[:, 0], pred[:, 1], ref[:, 0], ref[:, 1])
    assert result == pytest.approx(expected)
    assert 0 < expected["acc_200km"] < 1
    # incremental use (add_batch) and custom thresholds
    for start in range(0, 50, 20):
        metric.add_batch(predictions=pred[start:start + 20].tolist(), references=ref[start:start + 20].tolist())
    assert metric.compute(thresholds_km=(100,)) == pytest.approx(
        geolocation_metrics(pred[:, 0], pred[:, 1], ref[:, 0], ref[:, 1], thresholds_km=(100,))
    )
    with pytest.raises(ValueError, match=r"predictions\[0\]"):
        metric.compute(predictions=[[95.0, 0.0]], references=[[0.0, 0.0]])
    with pytest.raises(ValueError, match="0 distances"):
        metric.compute(predictions=[], references=[])
