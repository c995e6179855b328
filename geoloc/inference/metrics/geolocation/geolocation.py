"""`evaluate` metric module for worldwide image geolocation, wrapping `geoloc.inference.metrics.geolocation_metrics`.

Load it from a checkout (offline, a local path): `evaluate.load("geoloc/inference/metrics/geolocation")`.
"""

import datasets
import evaluate

from geoloc.inference.metrics import DEFAULT_THRESHOLDS_KM, geolocation_metrics

_CITATION = """\
@inproceedings{vo2017revisiting,
  title={Revisiting IM2GPS in the Deep Learning Era},
  author={Vo, Nam and Jacobs, Nathan and Hays, James},
  booktitle={ICCV}, year={2017}
}
@inproceedings{astruc2024osv5m,
  title={OpenStreetView-5M: The Many Roads to Global Visual Geolocation},
  author={Astruc, Guillaume and Dufour, Nicolas and Siglidis, Ioannis and others},
  booktitle={CVPR}, year={2024}
}
"""

_DESCRIPTION = """\
Geolocation accuracy: the fraction of predictions within 1 / 25 / 200 / 750 / 2500 km (street, city,
region, country, continent) of the true location, the mean and median error in km, and the OSV-5M GeoScore
(mean of 5000 * exp(-d / 1492.7 km)). Distances are geodesics on the WGS84 ellipsoid.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: list of N `[latitude, longitude]` pairs in degrees (the model's best guess per image).
    references: list of N `[latitude, longitude]` pairs in degrees (the true locations).
    thresholds_km: optional tuple of distances (km) for the `acc_<t>km` keys; default (1, 25, 200, 750, 2500).
Returns:
    acc_1km, acc_25km, acc_200km, acc_750km, acc_2500km: fractions in [0, 1] (keys follow thresholds_km),
    mean_km, median_km: error in km,
    geoscore: in [0, 5000].
Raises:
    ValueError: on coordinates out of range / NaN (naming the first bad one) or an empty input.
Example:
    >>> metric = evaluate.load("geoloc/inference/metrics/geolocation")
    >>> metric.compute(predictions=[[48.8566, 2.3522]], references=[[51.5074, -0.1278]])["acc_750km"]
    1.0
"""

_PAIR = datasets.Sequence(datasets.Value("float64"), length=2)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Geolocation(evaluate.Metric):
    """Geolocation accuracy at distance thresholds, mean/median error and GeoScore."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": _PAIR, "references": _PAIR}),
            reference_urls=["https://arxiv.org/abs/1705.04838", "https://arxiv.org/abs/2404.18873"],
        )

    def _compute(self, predictions, references, thresholds_km=DEFAULT_THRESHOLDS_KM):
        return geolocation_metrics(
            [pair[0] for pair in predictions],
            [pair[1] for pair in predictions],
            [pair[0] for pair in references],
            [pair[1] for pair in references],
            thresholds_km=thresholds_km,
        )
