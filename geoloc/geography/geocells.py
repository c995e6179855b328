"""Nested S2 geocell hierarchies for GeoHier: built from training coordinates (Müller-Budack et al., ECCV 2018)
or read from the published MP-16 partitions, and used to label new coordinates.

A cell table is a list with one entry per level, coarse to fine; each entry is a dict of numpy arrays of length
n (the cells of that level, sorted by S2 cell id for built tables, by class label for loaded ones):
`tokens` (S2 tokens, str), `latitudes`, `longitudes` (the cell's answer point: for built tables the medoid, the
level's training point in the cell nearest their mean on the unit sphere, so the answer is a place where a photo
was taken; for imported GeoEstimation partitions the published mean, the only position they give), `parents` (int64 row of the containing cell in the previous level, -1 for level 0)
and `counts` (int64 training points). `GeoHierModel.set_cell_table` takes it as is.

Leaf cell ids come from the s2geometry library (one call per point, ~3 µs); everything after that (parents at a
level, cell ranges, grouping) is numpy over the 64-bit ids: the parent of `id` at level k is
`(id & ~(lsb - 1)) | lsb` with `lsb = 1 << 2 * (30 - k)`.
"""

import argparse
import csv
import json
import logging
from pathlib import Path

import numpy as np
import s2geometry

from geoloc.cli import HelpFormatter
from geoloc.geography.geodesy import unit_vectors, validate_lat_lon, vector_directions

logger = logging.getLogger(__name__)

MAX_LEVEL = 30
# GeoEstimation's partitions: (tau_min, tau_max) for coarse, middle, fine.
GEOESTIMATION_LEVELS = ((50, 5000), (50, 2000), (50, 1000))
GEOESTIMATION_MIN_LEVEL = 2
GEOESTIMATION_COLUMNS = ("class_label", "hex_id", "imgs_per_cell", "latitude_mean", "longitude_mean")
# `auto` levels: GeoEstimation's thresholds were set for MP-16's training images; smaller sets get them scaled
# by size, but never below these tau_max floors (a cell needs ~10 images to be learnable), and splitting starts
# at the 6 S2 faces so that a few hundred points still get a coarse level of a few cells.
MP16_TRAINING_IMAGES = 4_723_695
AUTO_TAU_MAX_FLOORS = (100, 40, 20)
AUTO_MIN_LEVEL = 0


def leaf_cell_ids(latitudes, longitudes) -> np.ndarray:
    """S2 leaf (level 30) cell ids of coordinates, `(N,)` degrees each -> `(N,)` uint64.

    Example:
        >>> hex(int(leaf_cell_ids([48.8566], [2.3522])[0]))[:6]
        '0x47e6'
    """
    latitudes, longitudes = validate_lat_lon(latitudes, longitudes)
    from_degrees, cell_id = s2geometry.S2LatLng.FromDegrees, s2geometry.S2CellId
    return np.fromiter(
        (cell_id(from_degrees(lat, lon)).id() for lat, lon in zip(latitudes.tolist(), longitudes.tolist())),
        dtype=np.uint64,
        count=len(latitudes),
    )


def _lowest_bit(levels: np.ndarray) -> np.ndarray:
    return np.left_shift(np.uint64(1), (2 * (MAX_LEVEL - levels.astype(np.int64))).astype(np.uint64))


def parent_at_level(cell_ids: np.ndarray, levels) -> np.ndarray:
    """Ancestor of each S2 cell id at the given level(s) (scalar or per-id array, each <= the id's level), uint64."""
    lsb = _lowest_bit(np.broadcast_to(np.asarray(levels), cell_ids.shape))
    return (cell_ids & ~(lsb - np.uint64(1))) | lsb


def cell_ranges(cell_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest leaf id inside each S2 cell (uint64 arrays): a leaf is in the cell iff in the range."""
    cell_ids = np.asarray(cell_ids, dtype=np.uint64)
    lsb = cell_ids & (~cell_ids + np.uint64(1))
    return cell_ids - (lsb - np.uint64(1)), cell_ids + (lsb - np.uint64(1))


def _tokens(cell_ids: np.ndarray) -> np.ndarray:
    return np.array([s2geometry.S2CellId(int(i)).ToToken() for i in cell_ids.tolist()])


def _token_ids(tokens) -> np.ndarray:
    ids = []
    for token in tokens:
        cell = s2geometry.S2CellId.FromToken(str(token))
        if not cell.is_valid():
            raise ValueError(f"{token!r} is not a valid S2 cell token.")
        ids.append(cell.id())
    return np.array(ids, dtype=np.uint64)


def _spherical_means(groups: np.ndarray, n_groups: int, latitudes: np.ndarray, longitudes: np.ndarray):
    """Mean position of the points of each group on the unit sphere (right across the antimeridian), degrees."""
    sums = [np.bincount(groups, weights=c, minlength=n_groups) for c in unit_vectors(latitudes, longitudes).T]
    return vector_directions(np.stack(sums, axis=-1))


def _medoids(groups: np.ndarray, n_groups: int, latitudes: np.ndarray, longitudes: np.ndarray):
    """The answer point of each group: its training point nearest (great-circle) to the group's spherical mean,
    degrees. Unlike the mean, it is a place where a photo was taken: a cell spanning Europe and the Arctic answers
    on land, not in the sea between them."""
    points = unit_vectors(latitudes, longitudes)
    sums = np.stack([np.bincount(groups, weights=c, minlength=n_groups) for c in points.T], axis=-1)
    closeness = (points * sums[groups]).sum(axis=1)  # cosine to the group's mean direction, times its length
    order = np.lexsort((-closeness, groups))
    first = order[np.searchsorted(groups[order], np.arange(n_groups))]
    return latitudes[first].astype(np.float64), longitudes[first].astype(np.float64)


def _check_levels(levels) -> list[tuple[int, int]]:
    levels = [tuple(level) for level in levels]
    if not levels:
        raise ValueError("levels must hold at least one (tau_min, tau_max) pair.")
    for tau_min, tau_max in levels:
        if not 1 <= tau_min <= tau_max:
            raise ValueError(f"Each level needs 1 <= tau_min <= tau_max, got ({tau_min}, {tau_max}).")
    return levels


def auto_geocell_levels(count: int) -> list[tuple[int, int]]:
    """Geocell thresholds suited to `count` training points: the paper's `(tau_min, tau_max)` per level scaled by
    `count / MP16_TRAINING_IMAGES`, tau_max at least `AUTO_TAU_MAX_FLOORS` and tau_min at least 1. At MP-16 size
    these are the paper's levels; 800 world-map points get about 18 / 48 / 103 cells, 300 points 6 / 18 / 33.

    Example:
        >>> auto_geocell_levels(4_723_695)
        [(50, 5000), (50, 2000), (50, 1000)]
        >>> auto_geocell_levels(800)
        [(1, 100), (1, 40), (1, 20)]
    """
    scale = count / MP16_TRAINING_IMAGES
    return [(max(1, round(tau_min * scale)), max(floor, round(tau_max * scale)))
            for (tau_min, tau_max), floor in zip(GEOESTIMATION_LEVELS, AUTO_TAU_MAX_FLOORS)]


def parse_geocell_levels(text: str) -> list[tuple[int, int]] | None:
    """`"auto"` -> None (use `auto_geocell_levels`); `"50:5000,50:2000"` -> `[(50, 5000), (50, 2000)]`, any number
    of levels, coarse to fine.

    Raises:
        ValueError: naming the expected form.
    """
    if text.strip() == "auto":
        return None
    try:
        levels = [tuple(int(value) for value in level.split(":")) for level in text.split(",")]
    except ValueError:
        levels = []
    if not levels or any(len(level) != 2 for level in levels):
        raise ValueError(f"Geocell levels must be 'auto' or TAU_MIN:TAU_MAX pairs such as '50:5000,50:2000,50:1000', "
                         f"got {text!r}.")
    return _check_levels(levels)


def geocells_for(latitudes, longitudes, levels: str = "auto") -> tuple[list[dict], np.ndarray]:
    """`build_geocells` with levels given as text (`parse_geocell_levels`): `auto` scales them to the number of
    points and starts splitting at the S2 faces; explicit levels start at GeoEstimation's S2 level 2.

    Raises:
        ValueError: when a level ends up with fewer than 2 cells (too little data for these thresholds), saying
            what to change.
    """
    parsed = parse_geocell_levels(levels)
    count = len(np.asarray(latitudes))
    if parsed is None:
        cells, labels = build_geocells(latitudes, longitudes, auto_geocell_levels(count), min_level=AUTO_MIN_LEVEL)
    else:
        cells, labels = build_geocells(latitudes, longitudes, parsed)
    sizes = [len(level["tokens"]) for level in cells]
    if min(sizes) < 2:
        raise ValueError(
            f"{count} training points give {sizes} geocells per level ({levels}); every level needs at least 2 cells: "
            "add data, or lower the thresholds or use fewer levels (e.g. --geocell-levels 1:20,1:5)."
        )
    return cells, labels


def build_geocells(
    latitudes,
    longitudes,
    levels=GEOESTIMATION_LEVELS,
    min_level: int = GEOESTIMATION_MIN_LEVEL,
    max_level: int = MAX_LEVEL,
) -> tuple[list[dict], np.ndarray]:
    """Adaptive, nested S2 partitions of training coordinates, one per (tau_min, tau_max) level.

    Level 0 starts from the S2 cells at `min_level` holding the points; every cell with more than tau_max points is
    replaced by its four children (up to `max_level`), and cells with fewer than tau_min points are dropped with
    their points (Müller-Budack et al., ECCV 2018). Each finer level starts from the cells of the level above and
    splits them further, so every cell has exactly one parent: the coarse cell it was split from (possibly itself).
    Points dropped at a level stay unlabelled at the finer levels.

    Args:
        latitudes, longitudes: `(N,)` degrees.
        levels: `(tau_min, tau_max)` per level, coarse to fine.
        min_level, max_level: S2 levels where splitting starts and stops (cells at `max_level` may hold more than
            tau_max points).

    Returns:
        `(cells, labels)`: the cell table (see the module docstring) and `labels`, int64 `(N, len(levels))`: the
        row of each point's cell at each level, -1 where its cell was dropped.

    Example:
        >>> cells, labels = build_geocells([48.85, 48.86, 40.7], [2.35, 2.36, -74.0], levels=[(1, 2)])
        >>> [len(level["tokens"]) for level in cells], labels.shape
        ([2], (3, 1))
    """
    levels = _check_levels(levels)
    if not 0 <= min_level <= max_level <= MAX_LEVEL:
        raise ValueError(f"Need 0 <= min_level <= max_level <= 30, got min_level={min_level}, max_level={max_level}.")
    latitudes, longitudes = validate_lat_lon(latitudes, longitudes)
    leaves = leaf_cell_ids(latitudes, longitudes)
    point_levels = np.full(len(leaves), min_level, dtype=np.int64)
    alive = np.ones(len(leaves), dtype=bool)
    labels = np.full((len(leaves), len(levels)), -1, dtype=np.int64)
    cells = []
    for depth, (tau_min, tau_max) in enumerate(levels):
        # Split, over all still-labelled points at once, every cell holding more than tau_max of them.
        while True:
            active = np.flatnonzero(alive)
            ids = parent_at_level(leaves[active], point_levels[active])
            unique, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
            split = (counts > tau_max)[inverse] & (point_levels[active] < max_level)
            if not split.any():
                break
            point_levels[active[split]] += 1
        keep = counts >= tau_min
        alive[active[~keep[inverse]]] = False
        rows = np.cumsum(keep) - 1
        active, unique, counts = active[keep[inverse]], unique[keep], counts[keep]
        labels[active, depth] = rows[inverse[keep[inverse]]]
        lat, lon = _medoids(labels[active, depth], len(unique), latitudes[active], longitudes[active])
        if depth == 0:
            parents = np.full(len(unique), -1, dtype=np.int64)
        else:
            # Every point of a cell has the same parent; read it from any one of them.
            parents = np.empty(len(unique), dtype=np.int64)
            parents[labels[active, depth]] = labels[active, depth - 1]
        cells.append({"tokens": _tokens(unique), "latitudes": lat, "longitudes": lon, "parents": parents,
                      "counts": counts.astype(np.int64)})
    return cells, labels


def assign_geocells(cells: list[dict], latitudes, longitudes) -> np.ndarray:
    """Label coordinates with a cell table: `(N,)` degrees -> int64 `(N, levels)` cell rows, -1 outside every cell.

    Example:
        >>> cells, labels = build_geocells([48.85, 40.7], [2.35, -74.0], levels=[(1, 1)])
        >>> assign_geocells(cells, [48.85, 0.0], [2.35, 0.0]).tolist()
        [[0], [-1]]
    """
    leaves = leaf_cell_ids(latitudes, longitudes)
    labels = np.full((len(leaves), len(cells)), -1, dtype=np.int64)
    for depth, level in enumerate(cells):
        low, high = cell_ranges(_token_ids(level["tokens"]))
        order = np.argsort(low)
        position = np.searchsorted(low[order], leaves, side="right") - 1
        candidate = order[np.clip(position, 0, None)]
        inside = (position >= 0) & (leaves <= high[candidate])
        labels[inside, depth] = candidate[inside]
    return labels


def _read_geoestimation_csv(path) -> dict:
    """One GeoEstimation partition file: optional `key: value` preamble lines, then the CSV with
    class_label, hex_id, imgs_per_cell, latitude_mean, longitude_mean."""
    with open(path, newline="") as handle:
        lines = handle.read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("class_label")), None)
    if start is None:
        raise ValueError(f"{path}: no header line starting with 'class_label' ({', '.join(GEOESTIMATION_COLUMNS)}).")
    rows = list(csv.DictReader(lines[start:]))
    missing = set(GEOESTIMATION_COLUMNS) - set(rows[0] if rows else GEOESTIMATION_COLUMNS)
    if not rows or missing:
        raise ValueError(f"{path}: expected rows with columns {GEOESTIMATION_COLUMNS}, missing {sorted(missing)}.")
    rows.sort(key=lambda row: int(row["class_label"]))
    if [int(row["class_label"]) for row in rows] != list(range(len(rows))):
        raise ValueError(f"{path}: class_label must be 0..{len(rows) - 1}, each once.")
    latitudes, longitudes = validate_lat_lon(
        [float(row["latitude_mean"]) for row in rows], [float(row["longitude_mean"]) for row in rows], str(path)
    )
    return {
        "tokens": np.array([row["hex_id"] for row in rows]),
        "latitudes": latitudes,
        "longitudes": longitudes,
        "counts": np.array([int(row["imgs_per_cell"]) for row in rows], dtype=np.int64),
    }


def load_geoestimation_partitions(paths) -> list[dict]:
    """Read published GeoEstimation partitions (e.g. MP-16's `cells_50_5000.csv`, `cells_50_2000.csv`,
    `cells_50_1000.csv`, coarse to fine) into a cell table; rows keep the files' class labels.

    Each cell's parent is the cell of the previous level that contains it (S2 containment). A cell contained in
    no coarser cell gets the coarser cell whose centroid is nearest, with a warning.

    Example:
        >>> cells = load_geoestimation_partitions(["cells_50_5000.csv", "cells_50_2000.csv"])  # doctest: +SKIP
    """
    cells = [_read_geoestimation_csv(path) for path in paths]
    if not cells:
        raise ValueError("Give at least one partition file.")
    cells[0]["parents"] = np.full(len(cells[0]["tokens"]), -1, dtype=np.int64)
    for depth in range(1, len(cells)):
        coarse, fine = cells[depth - 1], cells[depth]
        fine_ids = _token_ids(fine["tokens"])
        coarse_low, coarse_high = cell_ranges(_token_ids(coarse["tokens"]))
        fine_low, fine_high = cell_ranges(fine_ids)
        order = np.argsort(coarse_low)
        position = np.searchsorted(coarse_low[order], fine_low, side="right") - 1
        parents = order[np.clip(position, 0, None)]
        contained = (position >= 0) & (fine_high <= coarse_high[parents])
        if not contained.all():
            orphans = np.flatnonzero(~contained)
            logger.warning(
                "%d cells of level %d (e.g. %s) lie in no cell of level %d; using the nearest coarse centroid.",
                len(orphans), depth, fine["tokens"][orphans[0]], depth - 1,
            )
            parents[orphans] = _nearest(coarse, fine["latitudes"][orphans], fine["longitudes"][orphans])
        fine["parents"] = parents.astype(np.int64)
    return cells


def _nearest(cells: dict, latitudes: np.ndarray, longitudes: np.ndarray) -> np.ndarray:
    """Row of the cell centroid nearest (great-circle) to each point."""
    points, centroids = unit_vectors(latitudes, longitudes), unit_vectors(cells["latitudes"], cells["longitudes"])
    return np.argmax(points @ centroids.T, axis=1)


def save_cell_table(cells: list[dict], path) -> None:
    """Write a cell table as JSON (`{"levels": [{tokens, latitudes, longitudes, parents, counts}, ...]}`)."""
    levels = [{key: np.asarray(value).tolist() for key, value in level.items()} for level in cells]
    Path(path).write_text(json.dumps({"levels": levels}))


def load_cell_table(path) -> list[dict]:
    """Read a cell table written by `save_cell_table` (numpy arrays again)."""
    levels = json.loads(Path(path).read_text())["levels"]
    dtypes = {"tokens": str, "latitudes": np.float64, "longitudes": np.float64, "parents": np.int64,
              "counts": np.int64}
    return [{key: np.asarray(level[key], dtype=dtype) for key, dtype in dtypes.items()} for level in levels]


# ---------------------------------------------------------------------------------------------------- CLI
def _load_coordinates(dataset: str, split: str, latitude_column: str, longitude_column: str):
    """The coordinates of a CSV / parquet / JSON file of coordinates, or of any dataset `geoloc train` reads."""
    import datasets

    path = Path(dataset)
    if path.suffix in (".csv", ".parquet", ".json", ".jsonl"):
        builder = {".jsonl": "json"}.get(path.suffix, path.suffix[1:])
        data = datasets.load_dataset(builder, data_files=str(path), split="train")
        data = data.select_columns([latitude_column, longitude_column]).with_format("numpy")
        return data[latitude_column], data[longitude_column]
    from ..data.dataset import LATITUDE, LONGITUDE, load_geo_dataset

    data = load_geo_dataset(dataset, split, lat_column=latitude_column, lon_column=longitude_column)
    data = data.select_columns([LATITUDE, LONGITUDE]).with_format("numpy")
    return data[LATITUDE], data[LONGITUDE]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geoloc geocells", description="Build or import S2 geocell hierarchies.",
                                     formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="adaptive S2 cells from a dataset's coordinates",
                                formatter_class=HelpFormatter)
    build.add_argument("--dataset", required=True,
                       help="a CSV / parquet / JSON file of coordinates, or any dataset `geoloc train --dataset` reads "
                            "(image folder with metadata.csv, shards, save_to_disk folder, Hub id)")
    build.add_argument("--split", default="train", help="split of the dataset")
    build.add_argument("--latitude-column", default="latitude", help="latitude column of --dataset")
    build.add_argument("--longitude-column", default="longitude", help="longitude column of --dataset")
    build.add_argument("--levels", default="auto",
                       help="'auto' (the paper's thresholds scaled to the data size) or TAU_MIN:TAU_MAX pairs, coarse "
                            "to fine, e.g. 50:5000,50:2000,50:1000 (the paper's, for MP-16)")
    build.add_argument("--output", required=True, help="cell table JSON to write; `geoloc train --geocells` reads it")
    imported = commands.add_parser("import", help="read GeoEstimation partition CSVs (cells_50_5000.csv ...)",
                                   formatter_class=HelpFormatter)
    imported.add_argument("files", nargs="+", help="partition files, coarse to fine")
    imported.add_argument("--output", required=True, help="cell table JSON to write")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "build":
        latitudes, longitudes = _load_coordinates(args.dataset, args.split, args.latitude_column, args.longitude_column)
        cells, labels = geocells_for(latitudes, longitudes, args.levels)
        kept = (labels >= 0).mean(axis=0)
        summary = ", ".join(f"{len(level['tokens'])} cells ({share:.1%} of points)" for level, share in zip(cells, kept))
    else:
        cells = load_geoestimation_partitions(args.files)
        summary = ", ".join(f"{len(level['tokens'])} cells" for level in cells)
    save_cell_table(cells, args.output)
    print(f"Wrote {args.output}: {summary}.")
    return 0
