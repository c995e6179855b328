"""Geocell builder: coverage, tau bounds, nesting, poles / antimeridian, GeoEstimation files, CLI."""

import numpy as np
import pytest
import s2geometry

from geoloc.geography.geodesy import unit_vectors
from geoloc.data.worldmap import is_land

from geoloc import cli
from geoloc.geography.geocells import (
    assign_geocells,
    build_geocells,
    cell_ranges,
    leaf_cell_ids,
    load_cell_table,
    load_geoestimation_partitions,
    parent_at_level,
)

LEVELS = [(5, 200), (5, 60), (5, 20)]


def clustered_points(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.uniform([-70, -180], [70, 180], (12, 2))
    which = rng.integers(0, len(centres), n)
    latitudes = np.clip(centres[which, 0] + rng.normal(0, 3, n), -90, 90)
    longitudes = (centres[which, 1] + rng.normal(0, 3, n) + 180) % 360 - 180
    # A few isolated points, to be dropped.
    return np.r_[latitudes, 0.5, -33.3], np.r_[longitudes, -30.2, 100.1]


@pytest.fixture(scope="module")
def built():
    latitudes, longitudes = clustered_points()
    cells, labels = build_geocells(latitudes, longitudes, levels=LEVELS)
    return latitudes, longitudes, cells, labels


def s2_level(token: str) -> int:
    return s2geometry.S2CellId.FromToken(token).level()


def test_parent_at_level_matches_s2geometry():
    leaves = leaf_cell_ids([48.8566, -33.9, 89.99], [2.3522, 151.2, -179.99])
    for level in (0, 2, 13, 30):
        expected = [s2geometry.S2CellId(int(leaf)).parent(level).id() for leaf in leaves]
        assert parent_at_level(leaves, level).tolist() == expected


def test_every_point_in_exactly_one_cell_per_level(built):
    latitudes, longitudes, cells, labels = built
    assert labels.shape == (len(latitudes), len(LEVELS)) and labels.dtype == np.int64
    for depth, level in enumerate(cells):
        assert ((labels[:, depth] >= -1) & (labels[:, depth] < len(level["tokens"]))).all()
        np.testing.assert_array_equal(np.bincount(labels[labels[:, depth] >= 0, depth], minlength=len(level["tokens"])),
                                      level["counts"])
        assert len(set(level["tokens"])) == len(level["tokens"])
        # Cells of a level are disjoint: sorted ranges do not overlap.
        low, high = cell_ranges(np.array([s2geometry.S2CellId.FromToken(t).id() for t in level["tokens"]], np.uint64))
        order = np.argsort(low)
        assert (low[order][1:] > high[order][:-1]).all()
    assert (labels[-2:] == -1).all()  # the isolated points
    # Labelling the same points with the table gives the builder's labels.
    np.testing.assert_array_equal(assign_geocells(cells, latitudes, longitudes), labels)


def test_tau_bounds(built):
    *_, cells, _ = built
    for (tau_min, tau_max), level in zip(LEVELS, cells):
        assert level["counts"].min() >= tau_min
        assert level["counts"].max() <= tau_max
    assert len(cells[0]["tokens"]) < len(cells[1]["tokens"]) < len(cells[2]["tokens"])


def test_levels_nest(built):
    *_, cells, labels = built
    assert (cells[0]["parents"] == -1).all()
    for depth in range(1, len(cells)):
        labelled = labels[:, depth] >= 0
        # A point's fine cell's parent is its coarse cell; points dropped above stay dropped.
        np.testing.assert_array_equal(cells[depth]["parents"][labels[labelled, depth]], labels[labelled, depth - 1])
        assert (labels[labels[:, depth - 1] < 0, depth] == -1).all()
        # S2 containment of each cell in its parent.
        for token, parent in zip(cells[depth]["tokens"], cells[depth]["parents"]):
            child = s2geometry.S2CellId.FromToken(token)
            assert s2geometry.S2CellId.FromToken(cells[depth - 1]["tokens"][parent]).contains(child)


def test_answer_points_are_medoids_of_the_cell_points(built):
    latitudes, longitudes, cells, labels = built
    fine = cells[-1]
    for row in range(0, len(fine["tokens"]), 7):
        members = np.flatnonzero(labels[:, -1] == row)
        points = unit_vectors(latitudes[members], longitudes[members])
        mean = points.sum(axis=0)
        nearest = members[np.argmax(points @ mean)]  # the member nearest the spherical mean
        assert (fine["latitudes"][row], fine["longitudes"][row]) == (latitudes[nearest], longitudes[nearest])


def test_a_cell_spanning_sea_answers_where_its_points_are():
    # two clusters on either side of the North Sea (Scotland, Norway): their mean is at sea, the medoid is not
    rng = np.random.default_rng(3)
    latitudes = np.r_[rng.normal(57, 0.1, 30), rng.normal(61, 0.1, 31)]
    longitudes = np.r_[rng.normal(-4.5, 0.1, 30), rng.normal(9, 0.1, 31)]
    assert is_land(latitudes, longitudes).all()
    assert not is_land([59.2], [2.3])[0]  # about their spherical mean
    cells, _ = build_geocells(latitudes, longitudes, levels=[(10, 10_000)], min_level=0)
    assert len(cells[0]["tokens"]) == 1
    answer = (cells[0]["latitudes"][0], cells[0]["longitudes"][0])
    assert answer in set(zip(latitudes.tolist(), longitudes.tolist()))
    assert is_land([answer[0]], [answer[1]])[0]


def test_poles_and_antimeridian():
    rng = np.random.default_rng(1)
    n = 400
    # A cluster straddling the antimeridian, and clusters at both poles (any longitude).
    latitudes = np.r_[rng.normal(-17, 0.2, n), 90 - rng.uniform(0, 0.01, n), np.full(n, -90.0)]
    straddle = rng.uniform(-0.3, 0.3, n)
    longitudes = np.r_[np.where(straddle < 0, 180 + straddle, straddle - 180), rng.uniform(-180, 180, 2 * n)]
    longitudes[n] = 180.0
    # At level 0 each cluster is in one S2 face (3, 2 and 5); face 3 is centred on the antimeridian.
    cells, labels = build_geocells(latitudes, longitudes, levels=[(10, 10_000)], min_level=0)
    assert (labels >= 0).all() and list(cells[0]["tokens"]) == ["5", "7", "b"]
    straddling = labels[0, 0]
    assert abs(cells[0]["longitudes"][straddling]) > 179.5  # not ~0, as a plain mean of longitudes would give
    assert abs(cells[0]["latitudes"][straddling] + 17) < 0.1
    north, south = labels[n, 0], labels[2 * n, 0]
    assert cells[0]["latitudes"][north] > 89.9 and cells[0]["latitudes"][south] < -89.9


def test_invalid_inputs():
    with pytest.raises(ValueError, match="latitude"):
        build_geocells([91.0], [0.0])
    with pytest.raises(ValueError, match="longitude"):
        build_geocells([0.0], [180.5])
    with pytest.raises(ValueError, match="tau_min <= tau_max"):
        build_geocells([0.0], [0.0], levels=[(10, 5)])
    with pytest.raises(ValueError, match="min_level"):
        build_geocells([0.0], [0.0], min_level=31)


def write_geoestimation_csv(path, level):
    lines = ["num_images: 123", "min_concept_probability: ---",
             "class_label,hex_id,imgs_per_cell,latitude_mean,longitude_mean"]
    order = np.random.default_rng(0).permutation(len(level["tokens"]))  # class labels need not follow S2 order
    for label, row in enumerate(order):
        lines.append(f"{label},{level['tokens'][row]},{level['counts'][row]},{level['latitudes'][row]},"
                     f"{level['longitudes'][row]}")
    path.write_text("\n".join(lines) + "\n")
    return order


def test_load_geoestimation_partitions(built, tmp_path):
    *_, cells, _ = built
    paths = [tmp_path / f"cells_{depth}.csv" for depth in range(3)]
    orders = [write_geoestimation_csv(path, level) for path, level in zip(paths, cells)]
    loaded = load_geoestimation_partitions(paths)
    for depth, (level, order) in enumerate(zip(loaded, orders)):
        assert list(level["tokens"]) == list(cells[depth]["tokens"][order])
        np.testing.assert_allclose(level["latitudes"], cells[depth]["latitudes"][order])
        if depth:
            # Parent rows point at the same S2 cells as in the built table.
            built_parent_tokens = cells[depth - 1]["tokens"][cells[depth]["parents"][order]]
            assert list(loaded[depth - 1]["tokens"][level["parents"]]) == list(built_parent_tokens)


def test_orphan_cells_get_the_nearest_parent(tmp_path, caplog):
    coarse = {"tokens": ["47", "89"], "counts": [60, 60], "latitudes": [48.0, 40.0], "longitudes": [2.0, -74.0]}
    # "0d" (Iberia) lies in neither coarse cell; its centroid is nearest the first one.
    fine = {"tokens": ["47c", "0d", "89c"], "counts": [50, 50, 50], "latitudes": [50.0, 40.4, 40.7],
            "longitudes": [4.0, -3.7, -74.0], }
    paths = [tmp_path / "coarse.csv", tmp_path / "fine.csv"]
    for path, level in zip(paths, (coarse, fine)):
        write_geoestimation_csv(path, {k: np.asarray(v) for k, v in level.items()})
    loaded = load_geoestimation_partitions(paths)
    parent_of = dict(zip(loaded[1]["tokens"], loaded[0]["tokens"][loaded[1]["parents"]]))
    assert parent_of == {"47c": "47", "0d": "47", "89c": "89"}
    assert "lie in no cell" in caplog.text


def test_bad_partition_file(tmp_path):
    path = tmp_path / "cells.csv"
    path.write_text("id,token\n0,47\n")
    with pytest.raises(ValueError, match="class_label"):
        load_geoestimation_partitions([path])


def test_cli_build_and_import(tmp_path, capsys):
    latitudes, longitudes = clustered_points(800, seed=3)
    data = tmp_path / "points.csv"
    data.write_text("latitude,longitude\n" + "\n".join(f"{a},{b}" for a, b in zip(latitudes, longitudes)) + "\n")
    output = tmp_path / "cells.json"
    assert cli.main(["geocells", "build", "--dataset", str(data), "--output", str(output),
                     "--levels", "5:100,5:30"]) == 0
    assert "Wrote" in capsys.readouterr().out
    table = load_cell_table(output)
    expected, _ = build_geocells(latitudes, longitudes, levels=[(5, 100), (5, 30)])
    for level, reference in zip(table, expected):
        assert list(level["tokens"]) == list(reference["tokens"])
        np.testing.assert_array_equal(level["parents"], reference["parents"])
        np.testing.assert_allclose(level["longitudes"], reference["longitudes"])
    csvs = [tmp_path / "coarse.csv", tmp_path / "fine.csv"]
    for path, level in zip(csvs, table):
        write_geoestimation_csv(path, level)
    assert cli.main(["geocells", "import", *map(str, csvs), "--output", str(tmp_path / "imported.json")]) == 0
    assert [len(level["tokens"]) for level in load_cell_table(tmp_path / "imported.json")] == [
        len(level["tokens"]) for level in table
    ]
