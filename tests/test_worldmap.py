"""geoloc.data.worldmap: the map's pixel <-> coordinate mapping, crops, splits and the CLI."""

import numpy as np
import pytest

from geoloc.data.dataset import load_geo_dataset
from geoloc.data.worldmap import (build_worldmap_splits, coordinates_to_pixels, is_land, load_world_map, main,
                             render_crop, sample_points)


def test_map_and_pixel_mapping():
    assert load_world_map().shape == (360, 720, 3)
    rows, cols = coordinates_to_pixels([90.0, 0.0, -89.75], [-180.0, 0.0, 179.75])
    np.testing.assert_allclose(rows, [0, 180, 359.5])
    np.testing.assert_allclose(cols, [0, 360, 719.5])
    # Sahara, Greenland ice, Amazon are land; mid-Pacific and mid-Atlantic are water.
    assert is_land([23.0, 72.0, -5.0, 0.0, 30.0], [10.0, -40.0, -62.0, -150.0, -40.0]).tolist() == [
        True, True, True, False, False]
    with pytest.raises(ValueError, match="latitude"):
        coordinates_to_pixels([91.0], [0.0])


def test_points_crops_and_disjoint_splits():
    rng = np.random.default_rng(0)
    points = sample_points(2000, rng, land_fraction=1.0)
    assert is_land(points[:, 0], points[:, 1]).all()
    # A crop wraps across the antimeridian without error and has the requested size.
    assert render_crop(10.0, 179.9, rng).size == (32, 32)
    splits = build_worldmap_splits(20, 10, seed=1)
    train = set(zip(splits["train"]["latitude"], splits["train"]["longitude"]))
    test = set(zip(splits["test"]["latitude"], splits["test"]["longitude"]))
    assert len(train) == 20 and len(test) == 10 and not train & test
    again = build_worldmap_splits(20, 10, seed=1)
    assert np.array_equal(np.asarray(again["test"][0]["image"]), np.asarray(splits["test"][0]["image"]))


def test_cli_writes_a_loadable_image_folder(tmp_path):
    assert main(["--output-dir", str(tmp_path), "--train", "12", "--test", "4"]) == 0
    train, test = load_geo_dataset(tmp_path, "train"), load_geo_dataset(tmp_path, "test")
    assert (train.num_rows, test.num_rows) == (12, 4)
    assert set(train.column_names) == {"image", "latitude", "longitude"}


def test_validation_and_buffered_splits(tmp_path):
    from geoloc.data.worldmap import overlaps_window

    splits = build_worldmap_splits(300, 20, seed=2, validation=20, buffered=True)
    train = np.stack([splits["train"]["latitude"], splits["train"]["longitude"]], axis=1)
    for name in ("validation", "test"):
        held_out = np.stack([splits[name]["latitude"], splits[name]["longitude"]], axis=1)
        assert len(held_out) == 20 and not overlaps_window(held_out, train, 8.0).any()
    plain = build_worldmap_splits(300, 20, seed=2, validation=20)
    held_out = np.stack([plain["test"]["latitude"], plain["test"]["longitude"]], axis=1)
    train = np.stack([plain["train"]["latitude"], plain["train"]["longitude"]], axis=1)
    assert overlaps_window(held_out, train, 8.0).mean() > 0.5  # a random split shares pixels across the split
    # Windows wrap at the antimeridian.
    assert overlaps_window(np.array([[0.0, 179.0]]), np.array([[3.0, -178.0]]), 8.0).all()
    assert main(["--output-dir", str(tmp_path), "--train", "12", "--test", "4", "--validation", "3"]) == 0
    assert load_geo_dataset(tmp_path, "validation").num_rows == 3
