"""Galleries, the one home of reading and building them: GPS coordinates from a CSV file, an array, a
`datasets.Dataset` or the Hub (`load_gallery`, `read_gallery_csv`), and the gallery a training run saves with its
model (`training_gallery`).

The model side (`GeoCLIPModel.set_gallery`) takes the (N, 2) array these return and stores it with the weights.
"""

import contextlib
import csv
import os

import numpy as np
import torch

from geo_core import validate_locations

COORDINATE_COLUMNS = (("lat", "lon"), ("latitude", "longitude"))


def find_coordinate_columns(names) -> tuple[str, str]:
    """Return the (latitude, longitude) column names among `names`: `LAT`/`LON` or `latitude`/`longitude`,
    case-insensitive. Raises ValueError listing the columns when neither pair is there, or naming the columns
    that differ only in case.

    Example:
        >>> find_coordinate_columns(["id", "LAT", "LON"])
        ('LAT', 'LON')
    """
    by_lower = {}
    for name in names:
        by_lower.setdefault(str(name).lower(), []).append(name)
    for pair in COORDINATE_COLUMNS:
        if all(column in by_lower for column in pair):
            ambiguous = [by_lower[column] for column in pair if len(by_lower[column]) > 1]
            if ambiguous:
                raise ValueError(f"Columns {ambiguous[0]} differ only in case: keep one {pair[0]}/{pair[1]} pair.")
            return by_lower[pair[0]][0], by_lower[pair[1]][0]
    raise ValueError(
        f"No coordinate columns among {list(names)}: expected LAT/LON or latitude/longitude (any case)."
    )


def read_gallery_csv(source, name: str | None = None) -> np.ndarray:
    """Read gallery coordinates from a CSV file with a header row.

    Args:
        source: a path, or an open text stream.
        name: how the CSV is called in error messages (defaults to the path).

    Returns: `np.ndarray` of shape (N, 2), float64 degrees (latitude, longitude), validated.

    Example:
        >>> import io
        >>> read_gallery_csv(io.StringIO("LAT,LON\\n48.8566,2.3522\\n"), "paris.csv")
        array([[48.8566,  2.3522]])
    """
    name = name or f"'{source}'"
    # utf-8-sig: a byte-order mark (as spreadsheet programs write) is not part of the first column's name
    opened = open(source, newline="", encoding="utf-8-sig") if isinstance(source, (str, os.PathLike)) else None
    with opened or contextlib.nullcontext(source) as stream:
        reader = csv.reader(stream)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"Gallery CSV {name} is empty.")
        header = [header[0].removeprefix("\ufeff"), *header[1:]]  # a text stream may still start with one
        latitude, longitude = (header.index(column) for column in find_coordinate_columns(header))
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                rows.append((float(row[latitude]), float(row[longitude])))
            except (ValueError, IndexError):
                raise ValueError(f"Gallery CSV {name}, line {line}: expected two numbers, got {row!r}.") from None
    if not rows:
        raise ValueError(f"Gallery CSV {name} has a header but no coordinates.")
    return validate_locations(np.asarray(rows, dtype=np.float64), f"gallery {name}").numpy()


def load_gallery(source, split: str = "train", columns: tuple[str, str] | None = None) -> np.ndarray:
    """Load gallery coordinates as a validated (N, 2) float64 array of (latitude, longitude) degrees.

    Args:
        source: one of
            - a CSV file path with a header: columns `LAT`/`LON` or `latitude`/`longitude` (any case);
            - a tensor, numpy array or nested list of shape (N, 2), (latitude, longitude);
            - a `datasets.Dataset` with a latitude and a longitude column;
            - a Hub dataset id (or a local dataset folder), read with `datasets.load_dataset(source, split=split)`.
        split: the split to read from a Hub dataset.
        columns: `(latitude_column, longitude_column)` of a dataset; found by name (as for CSVs) by default.

    Raises:
        ValueError: naming the source when it cannot be read, has no coordinate columns, is empty, or holds a
            coordinate outside [-90, 90] x [-180, 180] (see `geo_core.validate_locations`).

    Example:
        >>> load_gallery([[48.8566, 2.3522], [40.7128, -74.006]]).shape
        (2, 2)
    """
    import datasets

    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isfile(path):
            return read_gallery_csv(path)
        if path.lower().endswith(".csv"):
            raise ValueError(f"Gallery CSV '{path}' does not exist.")
        try:
            source = datasets.load_dataset(path, split=split)
        except Exception as error:  # datasets raises many types (not found, offline, bad config...)
            raise ValueError(f"Cannot load the gallery dataset '{path}' (split '{split}'): {error}") from None
        name = f"dataset '{path}'"
    elif isinstance(source, datasets.Dataset):
        name = "dataset"
    else:
        locations = validate_locations(source, "gallery")
        if len(locations) == 0:
            raise ValueError("The gallery is empty: it needs at least one (latitude, longitude) row.")
        return locations.to(torch.float64).numpy()
    if not isinstance(source, datasets.Dataset):
        raise ValueError(f"Gallery {name} must be one split (a datasets.Dataset), got {type(source).__name__}.")
    latitude, longitude = columns or find_coordinate_columns(source.column_names)
    for column in (latitude, longitude):
        if column not in source.column_names:
            raise ValueError(f"Gallery {name} has no column '{column}' (columns: {source.column_names}).")
    if len(source) == 0:
        raise ValueError(f"Gallery {name} is empty.")
    table = source.select_columns([latitude, longitude]).with_format("arrow")[:]  # float64 kept, None -> NaN
    locations = np.column_stack([table[column].to_numpy(zero_copy_only=False) for column in (latitude, longitude)])
    return validate_locations(locations, f"gallery {name}").to(torch.float64).numpy()


def training_gallery(latitudes, longitudes, size: int, seed: int) -> np.ndarray:
    """The gallery a training run saves with its GeoCLIP: the training coordinates deduplicated to the
    micro-degree, at most `size` of them (a seeded random subset, in sorted order).

    Args:
        latitudes, longitudes: N training coordinates each, degrees.
        size: the most points to keep. seed: seeds the subset.

    Returns: `np.ndarray` of shape (M, 2), M <= size, float64 (latitude, longitude) degrees.

    Example:
        >>> training_gallery([10.0, 10.0000001, 20.0], [5.0, 5.0, 6.0], size=10, seed=0).tolist()
        [[10.0, 5.0], [20.0, 6.0]]
    """
    points = np.unique(np.round(np.stack([latitudes, longitudes], axis=1), 6), axis=0)
    if len(points) > size:
        points = points[np.sort(np.random.default_rng(seed).choice(len(points), size, replace=False))]
    return points


__all__ = ["find_coordinate_columns", "load_gallery", "read_gallery_csv", "training_gallery"]
