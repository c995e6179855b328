"""Retrieval galleries: GPS coordinates from a CSV file, an array, a `datasets.Dataset` or the Hub.

The model side (`GeoCLIPModel.set_gallery`) takes the (N, 2) array this module returns.
"""

import os

import numpy as np
import torch

from modeling_geoclip import validate_locations
from modeling_geoclip.convert import find_coordinate_columns, read_gallery_csv


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
            coordinate outside [-90, 90] x [-180, 180] (see `modeling_geoclip.validate_locations`).

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


__all__ = ["load_gallery"]
