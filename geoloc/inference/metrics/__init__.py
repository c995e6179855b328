"""Geolocation metrics: accuracy within distance thresholds, mean/median error, and the OSV-5M GeoScore.

`geolocation_metrics` is the one metric function of the package; the `evaluate` module in
`geoloc/inference/metrics/geolocation/` (`evaluate.load("geoloc/inference/metrics/geolocation")`) and `geoloc evaluate` both
call it (the latter through `distance_metrics`, on distances it already computed for predictions.csv).
"""

import math

import numpy as np

from ...geography.geodesy import geodesic_distance_km

# The standard thresholds of the im2gps line of work: street, city, region, country, continent.
DEFAULT_THRESHOLDS_KM = (1, 25, 200, 750, 2500)

# OSV-5M GeoScore (Astruc et al., CVPR 2024), GeoGuessr's scoring: 5000 * exp(-d / 1492.7 km) per image.
GEOSCORE_MAX = 5000.0
GEOSCORE_SCALE_KM = 1492.7


def threshold_key(threshold_km: float) -> str:
    """Metric name for a threshold: 1 -> 'acc_1km', 0.5 -> 'acc_0.5km'."""
    return f"acc_{threshold_km:g}km"


def _check_thresholds(thresholds_km) -> tuple[float, ...]:
    thresholds = tuple(thresholds_km)
    if not thresholds:
        raise ValueError("thresholds_km is empty: pass at least one distance in km, e.g. (1, 25, 200, 750, 2500).")
    for threshold in thresholds:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)) or not (
            math.isfinite(threshold) and threshold > 0
        ):
            raise ValueError(f"thresholds_km must be positive finite numbers of km, got {threshold!r}.")
    keys = [threshold_key(threshold) for threshold in thresholds]
    if len(set(keys)) != len(keys):
        raise ValueError(f"thresholds_km has duplicates: {thresholds}.")
    return thresholds


def distance_metrics(distances_km, thresholds_km=DEFAULT_THRESHOLDS_KM) -> dict[str, float]:
    """Summarise N prediction errors (km) into the metrics of `geolocation_metrics`.

    Args:
        distances_km: array-like of N non-negative distances in km.
        thresholds_km: distances for the `acc_<t>km` keys.

    Raises:
        ValueError: on an empty input, negative or non-finite distances, or bad thresholds.

    Example:
        >>> distance_metrics([0.5, 100.0], thresholds_km=(1, 200))["acc_1km"]
        0.5
    """
    thresholds = _check_thresholds(thresholds_km)
    distances = np.asarray(distances_km, dtype=np.float64).reshape(-1)
    if distances.size == 0:
        raise ValueError("No predictions to score: got 0 distances.")
    bad = ~np.isfinite(distances) | (distances < 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"distances_km[{row}] = {distances[row]}: distances must be finite and >= 0 km.")
    metrics = {threshold_key(threshold): float(np.mean(distances <= threshold)) for threshold in thresholds}
    metrics["mean_km"] = float(distances.mean())
    metrics["median_km"] = float(np.median(distances))
    metrics["geoscore"] = float(np.mean(GEOSCORE_MAX * np.exp(-distances / GEOSCORE_SCALE_KM)))
    return metrics


def geolocation_metrics(pred_lat, pred_lon, ref_lat, ref_lon, thresholds_km=DEFAULT_THRESHOLDS_KM) -> dict[str, float]:
    """Score N predicted locations against N reference locations (degrees) with WGS84 geodesic distances.

    Args:
        pred_lat, pred_lon: predicted latitudes/longitudes, array-likes of N degrees.
        ref_lat, ref_lon: true latitudes/longitudes, N degrees.
        thresholds_km: distances (km) for the accuracy keys.

    Returns:
        `{"acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km"` (fractions in [0, 1] of predictions
        within each threshold, inclusive; keys follow `thresholds_km`), `"mean_km"`, `"median_km"`,
        `"geoscore"` (OSV-5M GeoScore, mean of 5000 * exp(-d / 1492.7 km), in [0, 5000])`}`.

    Raises:
        ValueError: on invalid coordinates (naming the first bad one), different lengths, or no predictions.

    Example:
        >>> m = geolocation_metrics([48.8566], [2.3522], [51.5074], [-0.1278])  # Paris for London: 344 km
        >>> m["acc_200km"], m["acc_750km"], round(m["mean_km"])
        (0.0, 1.0, 344)
    """
    thresholds = _check_thresholds(thresholds_km)
    distances = geodesic_distance_km(pred_lat, pred_lon, ref_lat, ref_lon, names=("predictions", "references"))
    return distance_metrics(distances, thresholds)


__all__ = ["DEFAULT_THRESHOLDS_KM", "distance_metrics", "geolocation_metrics", "threshold_key"]
