"""The one source of what both models share, owned by neither: coordinates and their validation, moving points
on the sphere, the `top_k` check, the `geolocate` output type and strict checkpoint loading (`geo_common`),
image decoding with pixel and resize budgets and the shared image processor (`geo_image_processing`),
checkpoint checks (`integrity`) and the `image-geolocation` pipeline (`pipeline_geolocation`).

Each model folder (`modeling_geoclip/`, `modeling_geohier/`) is pushed to the Hub alone as remote code, which
allows only relative imports, so each holds generated copies of these modules:

    python geoloc/hub/remote_code.py --sync     # rewrite the copies from geo_core/
    python geoloc/hub/remote_code.py --check    # exit 1 naming a stale copy (tests/test_remote_code.py too)

`geoloc` imports these helpers from here, never from a model's package. Like the model folders, this package
imports only torch, transformers, safetensors, numpy and PIL.
"""

from .geo_common import (
    EARTH_MEAN_RADIUS_KM,
    GeolocationOutput,
    check_top_k,
    coordinate_rule_violations,
    destination_points,
    validate_locations,
)
from .geo_image_processing import MAX_IMAGE_PIXELS, GeoImageProcessor, load_image

__all__ = [
    "EARTH_MEAN_RADIUS_KM",
    "GeoImageProcessor",
    "GeolocationOutput",
    "MAX_IMAGE_PIXELS",
    "check_top_k",
    "coordinate_rule_violations",
    "destination_points",
    "load_image",
    "validate_locations",
]
