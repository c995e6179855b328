"""Distances: known city pairs, agreement with geographiclib (poles, antimeridian, antipodes), errors."""

import numpy as np
import pytest
from geographiclib.geodesic import Geodesic

from geoloc.geography.geodesy import (
    EARTH_MEAN_RADIUS_KM,
    KM_PER_DEGREE,
    geodesic_distance_km,
    haversine_distance_km,
    unit_vectors,
    validate_lat_lon,
    vector_directions,
)

# Published WGS84 geodesic distances (km): city pairs, and the meridian half-circumference
# (pole to pole, 20,003.931 km, also the equatorial antipodal distance: the geodesic runs over a pole).
KNOWN_KM = [
    ((48.8566, 2.3522), (51.5074, -0.1278), 343.92),  # Paris - London
    ((40.7128, -74.0060), (34.0522, -118.2437), 3944.42),  # New York - Los Angeles
    ((51.5074, -0.1278), (40.7128, -74.0060), 5585.23),  # London - New York
    ((90.0, 0.0), (-90.0, 0.0), 20003.93),  # pole to pole
    ((0.0, 0.0), (0.0, 180.0), 20003.93),  # equatorial antipodes
]


@pytest.mark.parametrize(("first", "second", "expected"), KNOWN_KM)
def test_known_distances(first, second, expected):
    distance = geodesic_distance_km(first[0], first[1], second[0], second[1])
    assert distance.shape == (1,)
    assert distance[0] == pytest.approx(expected, abs=0.01)
    # the spherical fast path is close (within 0.6 %) but not equal
    assert haversine_distance_km(first[0], first[1], second[0], second[1])[0] == pytest.approx(expected, rel=6e-3)


def _edge_cases_and_random(n_random: int):
    rng = np.random.default_rng(0)
    edge = np.array([
        [90.0, 0.0, 89.9, 120.0],  # around the north pole
        [-90.0, 45.0, -89.5, -135.0],  # around the south pole
        [90.0, 0.0, 90.0, 180.0],  # the same pole under two longitudes
        [10.0, 179.9, -10.0, -179.9],  # across the antimeridian
        [0.0, 180.0, 0.0, -180.0],  # the same point written twice
        [0.0, 0.0, 0.5, 179.7],  # nearly antipodal (the hard case of the inverse problem)
        [30.0, -60.0, -30.0, 120.0],  # exactly antipodal
        [12.3, 45.6, 12.3, 45.6],  # zero distance
    ])
    random = np.column_stack([
        rng.uniform(-90, 90, n_random), rng.uniform(-180, 180, n_random),
        rng.uniform(-90, 90, n_random), rng.uniform(-180, 180, n_random),
    ])
    return np.concatenate([edge, random])


def test_matches_geographiclib_everywhere():
    points = _edge_cases_and_random(2000)
    ours = geodesic_distance_km(points[:, 0], points[:, 1], points[:, 2], points[:, 3])
    reference = np.array([
        Geodesic.WGS84.Inverse(*row, outmask=Geodesic.DISTANCE)["s12"] / 1000 for row in points
    ])
    assert np.abs(ours - reference).max() < 1e-6  # km, i.e. below a millimetre
    assert ours[2] == pytest.approx(0.0, abs=1e-9) and ours[4] == pytest.approx(0.0, abs=1e-9)
    fast = haversine_distance_km(points[:, 0], points[:, 1], points[:, 2], points[:, 3])
    assert np.abs(fast - reference).max() < 0.006 * reference.max()


def test_symmetric_and_vectorised():
    points = _edge_cases_and_random(100)
    forward = geodesic_distance_km(points[:, 0], points[:, 1], points[:, 2], points[:, 3])
    backward = geodesic_distance_km(points[:, 2], points[:, 3], points[:, 0], points[:, 1])
    np.testing.assert_allclose(forward, backward, atol=1e-9)
    assert forward.dtype == np.float64 and forward.shape == (len(points),)


@pytest.mark.parametrize("distance", [geodesic_distance_km, haversine_distance_km])
def test_rejects_bad_coordinates(distance):
    with pytest.raises(ValueError, match=r"first points\[1\] = \(91.0, 0.0\)"):
        distance([0.0, 91.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    with pytest.raises(ValueError, match=r"second points\[0\].*longitude must be in \[-180, 180\]"):
        distance([0.0], [0.0], [0.0], [200.0])
    with pytest.raises(ValueError, match="finite"):
        distance([np.nan], [0.0], [0.0], [0.0])
    with pytest.raises(ValueError, match="2 first points but 1 second points"):
        distance([0.0, 1.0], [0.0, 1.0], [0.0], [0.0])


def test_validate_lat_lon_returns_float_arrays():
    lat, lon = validate_lat_lon([48], [2])
    assert lat.dtype == np.float64 and lon.tolist() == [2.0]
    with pytest.raises(ValueError, match="2 latitudes but 1 longitudes"):
        validate_lat_lon([1, 2], [3])


def test_unit_vectors_round_trip_and_degree_length():
    rng = np.random.default_rng(0)
    latitudes, longitudes = rng.uniform(-89.9, 89.9, 1000), rng.uniform(-179.9, 179.9, 1000)
    vectors = unit_vectors(latitudes, longitudes)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-12)
    back_lat, back_lon = vector_directions(vectors * rng.uniform(0.1, 10, (1000, 1)))  # any length
    np.testing.assert_allclose(back_lat, latitudes, atol=1e-9)
    np.testing.assert_allclose(back_lon, longitudes, atol=1e-9)
    # the angle between unit vectors times the radius is the haversine distance
    angle = np.arccos(np.clip((vectors[:-1] * vectors[1:]).sum(axis=1), -1, 1))
    np.testing.assert_allclose(
        angle * EARTH_MEAN_RADIUS_KM,
        haversine_distance_km(latitudes[:-1], longitudes[:-1], latitudes[1:], longitudes[1:]), rtol=1e-6)
    # one degree along a meridian on the mean sphere
    assert haversine_distance_km(10.0, 20.0, 11.0, 20.0)[0] == pytest.approx(KM_PER_DEGREE, rel=1e-12)
    assert KM_PER_DEGREE == pytest.approx(111.195, abs=1e-3)
