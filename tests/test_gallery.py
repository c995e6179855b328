"""`geoloc.data.gallery`, the one home of galleries: what a training run saves as its GeoCLIP gallery, and CSV
reading from a stream (the converter reads the official wheel's gallery that way)."""

import io

import numpy as np
import pytest

from geoloc.data.gallery import find_coordinate_columns, read_gallery_csv, training_gallery


def test_training_gallery_deduplicates_to_the_microdegree():
    latitudes = [10.0, 10.0000004, 10.000001, -5.5, -5.5]
    longitudes = [20.0, 20.0000004, 20.0, 100.25, 100.25]
    gallery = training_gallery(latitudes, longitudes, size=100, seed=0)
    assert gallery.tolist() == [[-5.5, 100.25], [10.0, 20.0], [10.000001, 20.0]]
    assert gallery.dtype == np.float64


def test_training_gallery_caps_with_a_seeded_subset():
    rng = np.random.default_rng(1)
    latitudes, longitudes = rng.uniform(-90, 90, 500), rng.uniform(-180, 180, 500)
    full = training_gallery(latitudes, longitudes, size=500, seed=0)
    capped = training_gallery(latitudes, longitudes, size=50, seed=3)
    assert len(full) == 500 and len(capped) == 50
    assert np.array_equal(capped, training_gallery(latitudes, longitudes, size=50, seed=3))
    assert not np.array_equal(capped, training_gallery(latitudes, longitudes, size=50, seed=4))
    assert {tuple(row) for row in capped} <= {tuple(row) for row in full}
    assert np.array_equal(capped, np.unique(capped, axis=0))  # sorted, as the full gallery


def test_read_gallery_csv_from_a_stream_names_the_source():
    stream = io.StringIO("id,Latitude,LONGITUDE\na,48.8566,2.3522\nb,-33.8688,151.2093\n")
    np.testing.assert_array_equal(read_gallery_csv(stream, "cities.csv"), [[48.8566, 2.3522], [-33.8688, 151.2093]])
    with pytest.raises(ValueError, match=r"Gallery CSV cities.csv, line 3: expected two numbers, got \['b', 'x'\]"):
        read_gallery_csv(io.StringIO("lat,lon\n1,2\nb,x\n"), "cities.csv")
    with pytest.raises(ValueError, match=r"gallery cities.csv\[0\] = \(95.0, 2.0\): latitude must be in"):
        read_gallery_csv(io.StringIO("lat,lon\n95,2\n"), "cities.csv")
    assert find_coordinate_columns(["x", "Lon", "lat", "latitude"]) == ("lat", "Lon")
    with pytest.raises(ValueError, match=r"Columns \['lat', 'LAT'\] differ only in case"):
        find_coordinate_columns(["LON", "lat", "LAT", "lon"])
    with pytest.raises(ValueError, match=r"No coordinate columns among \['x', 'y'\]"):
        find_coordinate_columns(["x", "y"])
