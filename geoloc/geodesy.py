"""Geodesy: coordinate validation at the package boundary and great-circle / geodesic distances."""

import numpy as np

from modeling_geoclip import validate_locations


def validate_coordinates(latitudes, longitudes, name: str = "coordinates") -> tuple[np.ndarray, np.ndarray]:
    """Check paired latitudes/longitudes (degrees) and return them as float64 arrays.

    Wraps `modeling_geoclip.validate_locations`, the one coordinate validator of the package.

    Raises:
        ValueError: on different lengths, NaN/inf, |lat| > 90 or |lon| > 180, naming the first bad pair.

    Example:
        >>> lat, lon = validate_coordinates([48.85], [2.35])
    """
    latitudes = np.asarray(latitudes, dtype=np.float64).reshape(-1)
    longitudes = np.asarray(longitudes, dtype=np.float64).reshape(-1)
    if latitudes.shape != longitudes.shape:
        raise ValueError(f"{name}: got {len(latitudes)} latitudes but {len(longitudes)} longitudes.")
    validate_locations(np.stack([latitudes, longitudes], axis=1), name)
    return latitudes, longitudes
