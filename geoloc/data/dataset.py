"""Geolocation datasets in, images decoded and checked.

`load_geo_dataset` reads an image folder (`metadata.csv` with `file_name,latitude,longitude`), parquet or
webdataset shards, or a Hub dataset, and returns a `datasets.Dataset` (or `IterableDataset` when streaming)
with the canonical columns `image`, `latitude`, `longitude` (plus whatever else the source has, e.g.
`scene` or `id`). Rows with bad coordinates are counted and dropped with one warning. Images are *not*
decoded here (`Image(decode=False)`): `GeoCollator` decodes each one with `geo_core.load_image`
when a batch is built, and drops (and counts) the unreadable ones, so a single broken file never stops a
long run.

An image folder is confined to itself: a `metadata.csv` `file_name` outside the folder (absolute, or `..`
escaping it) or a symbolic link under it pointing outside makes `load_geo_dataset` raise a `ValueError`
naming it (the whole folder is refused: a dataset that reaches outside its folder is broken or hostile, and is
not trained on in part).

Example:
    >>> ds = load_geo_dataset("data/worldmap/train")  # doctest: +SKIP
    >>> collate = GeoCollator(GeoCLIPImageProcessor.from_pretrained("model_dir"))  # doctest: +SKIP
    >>> batch = collate([ds[0], ds[1]])  # {"pixel_values": (2, 3, H, W), "locations": (2, 2)}  # doctest: +SKIP
"""

import glob
import os
import zlib
from collections.abc import Sequence

import datasets
import numpy as np
import pandas as pd
import torch
from datasets import Image as ImageFeature
from datasets.exceptions import DatasetGenerationError
from transformers.utils import logging

from geo_core import MAX_IMAGE_PIXELS, coordinate_rule_violations, load_image

from ..sources import check_local_or_hub

logger = logging.get_logger(__name__)

IMAGE, LATITUDE, LONGITUDE = "image", "latitude", "longitude"
CANONICAL_COLUMNS = (IMAGE, LATITUDE, LONGITUDE)

# File extensions of the shard formats read by `load_geo_dataset`, and the `datasets` builder for each.
SHARD_BUILDERS = {".parquet": "parquet", ".tar": "webdataset"}



def is_inside(root: str, path: str) -> bool:
    """Whether absolute `path` is `root` or lies below it."""
    return os.path.commonpath([root, path]) == root


def check_no_outside_links(folder) -> None:
    """Refuse a dataset folder holding symbolic links (to files or folders, at any depth) whose target lies
    outside it: reading through them would read files the dataset does not contain.

    Raises:
        ValueError: naming the first such link, its target, and how many there are.
    """
    root = os.path.realpath(folder)
    outside, pending = [], [os.fspath(folder)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if not is_inside(root, target):
                        outside.append((entry.path, target))
                elif entry.is_dir():
                    pending.append(entry.path)
    if outside:
        link, target = outside[0]
        raise ValueError(
            f"Dataset folder '{folder}' holds {len(outside)} symbolic link(s) pointing outside it (first: "
            f"'{link}' -> '{target}'): copy the files in (e.g. `cp -rL`) or point at the folder that holds them."
        )


def confined_path(folder, name: str, what: str = "Image path") -> str:
    """`folder/name`, refusing a `name` that is absolute, leaves `folder` through `..`, or resolves outside it
    through a symbolic link (`DIR/images` -> elsewhere).

    Raises:
        ValueError: naming `name` and `folder` (and where a link leads).

    Example:
        >>> confined_path("data", "img/1.jpg")
        'data/img/1.jpg'
    """
    folder = os.fspath(folder)
    path = os.path.join(folder, name)
    if os.path.isabs(name) or not is_inside(os.path.abspath(folder), os.path.abspath(os.path.normpath(path))):
        raise ValueError(f"{what} {name!r} is outside the dataset folder '{folder}': give paths relative to it.")
    resolved = os.path.realpath(path)
    if not is_inside(os.path.realpath(folder), resolved):
        raise ValueError(f"{what} {name!r} is outside the dataset folder '{folder}': it is a symbolic link to "
                         f"'{resolved}'. Copy the files in (e.g. `cp -rL`) or point at the folder that holds them.")
    return path


def _shard_builder(source: str) -> str | None:
    """The `datasets` builder for a shard file, a glob of shards, or a folder of shards (else None)."""
    if os.path.isdir(source):
        extensions = {os.path.splitext(name)[1] for name in os.listdir(source)}
        if not (extensions & set(SHARD_BUILDERS)) or os.path.exists(os.path.join(source, "metadata.csv")):
            return None
        builders = {SHARD_BUILDERS[ext] for ext in extensions if ext in SHARD_BUILDERS}
        if len(builders) > 1:
            raise ValueError(f"Folder '{source}' mixes parquet and webdataset shards; point at one kind.")
        return builders.pop()
    return SHARD_BUILDERS.get(os.path.splitext(source)[1])


def _load_raw(source: str, split: str, streaming: bool, coordinates: bool = True):
    """Dispatch on the kind of `source`: image folder, parquet/webdataset shards, or a Hub dataset id. Without
    `coordinates`, an image folder needs no metadata.csv (its images' paths name the rows).

    Returns `(dataset, roots)`: the folders image cells holding only a path may be read from (None for an image
    folder, confined as a whole): a shard's folder, a saved dataset's, the Hugging Face caches for a Hub
    dataset (the files `datasets` downloaded; never other local files)."""
    builder = _shard_builder(source)
    if builder is not None:
        pattern = os.path.join(source, f"*{'.parquet' if builder == 'parquet' else '.tar'}") if os.path.isdir(
            source) else source
        files = sorted(glob.glob(pattern))
        if not files:
            raise ValueError(f"No {builder} shards match '{source}'.")
        roots = sorted({os.path.dirname(os.path.abspath(file)) for file in files})
        return datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming), roots
    if os.path.isdir(source) and is_saved_dataset(source):
        saved = datasets.load_from_disk(source)
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise ValueError(f"Saved dataset '{source}' has no split {split!r} (splits: {sorted(saved)}).")
            saved = saved[split]
        return (saved.to_iterable_dataset() if streaming else saved), [source]
    if os.path.isdir(source):
        if coordinates and not any(name == "metadata.csv" for _, _, names in os.walk(source) for name in names):
            raise ValueError(
                f"Image folder '{source}' has no metadata.csv: add one with columns file_name,latitude,longitude."
            )
        check_no_outside_links(source)
        try:
            return datasets.load_dataset("imagefolder", data_dir=source, split=split, streaming=streaming), None
        except DatasetGenerationError as error:  # e.g. a metadata file_name escaping the folder
            raise ValueError(f"Cannot read image folder '{source}': {error.__cause__ or error}") from error
    if os.path.exists(source):
        raise ValueError(
            f"Cannot read '{source}': pass an image folder with metadata.csv, .parquet or .tar (webdataset) "
            "shards, or a Hugging Face Hub dataset id."
        )
    from huggingface_hub import constants

    roots = [datasets.config.HF_DATASETS_CACHE, constants.HF_HUB_CACHE]
    return datasets.load_dataset(check_local_or_hub(source, "dataset"), split=split, streaming=streaming), roots


def confine_image_paths(dataset, roots: Sequence, source: str):
    """Refuse image cells that hold only a path (no bytes) leading outside `roots`: a parquet or Arrow cell
    `{"path": "/etc/passwd", "bytes": None}` would otherwise be read from this machine. A `Dataset` is checked
    column-wise at once (a `ValueError` naming the first such path); a streamed one drops such paths as rows
    pass (each becomes one unreadable image, reported as such).
    """
    roots = [os.path.realpath(root) for root in roots]

    def outside(path) -> bool:
        return path is not None and not any(is_inside(root, os.path.realpath(path)) for root in roots)

    if isinstance(dataset, datasets.IterableDataset):
        def drop_outside(row):
            if outside(row[IMAGE]["path"]) and not row[IMAGE]["bytes"]:
                logger.warning(f"Not reading image path {row[IMAGE]['path']!r}: it is outside {roots}.")
                row[IMAGE] = {"bytes": None, "path": None}
            return row

        return dataset.map(drop_outside)
    import pyarrow.compute as pc

    cells = dataset.data.column(IMAGE)
    path_only = pc.and_(pc.is_null(pc.struct_field(cells, "bytes")), pc.is_valid(pc.struct_field(cells, "path")))
    paths = pc.struct_field(cells, "path").filter(path_only).to_pylist()
    refused = [path for path in paths if outside(path)]
    if refused:
        raise ValueError(
            f"Dataset '{source}' has {len(refused)} image cell(s) naming a file outside {roots} instead of holding "
            f"its bytes (first: {refused[0]!r}): such files are not read. Embed the image bytes in the dataset."
        )
    return dataset


def is_saved_dataset(folder: str) -> bool:
    """Whether `folder` was written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return any(os.path.isfile(os.path.join(folder, name)) for name in ("state.json", "dataset_dict.json"))


def _canonical_names(dataset, renames: dict[str, str]):
    """Rename the user's columns (`renames`: theirs -> canonical, e.g. `{"lat": "latitude"}`)."""
    columns = dataset.column_names
    if columns is None:  # some streaming sources only know their columns after the first example
        columns = list(next(iter(dataset)).keys())
    missing = [name for name in renames if name not in columns]
    if missing:
        raise ValueError(
            f"Column(s) {missing} not found in the dataset (columns: {sorted(columns)}); "
            "pass --image-column/--lat-column/--lon-column."
        )
    clashes = [target for source, target in renames.items() if source != target and target in columns]
    if clashes:
        raise ValueError(f"Cannot rename to {clashes}: the dataset already has column(s) with these names.")
    renames = {source: target for source, target in renames.items() if source != target}
    return dataset.rename_columns(renames) if renames else dataset


def _as_floats(values) -> np.ndarray:
    """Any column of numbers/strings/None -> float64 array, with NaN where a value is not a number."""
    series = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype=object)
    return pd.to_numeric(series, errors="coerce").to_numpy(np.float64)


def invalid_coordinate_rows(latitudes, longitudes) -> list[tuple[int, str]]:
    """Rows whose coordinates `geo_core.validate_locations` rejects, as `(row, reason)` pairs, found with the same
    rules (`geo_core.coordinate_rule_violations`) column-wise (a million bad rows take about a second, not a minute
    row by row).

    Args:
        latitudes, longitudes: sequences of length N (numbers, numeric strings, None).

    Example:
        >>> invalid_coordinate_rows([10.0, 95.0, None], [20.0, 0.0, 5.0])[0][0]
        1
    """
    latitudes, longitudes = _as_floats(latitudes), _as_floats(longitudes)
    reasons = {}
    for bad, rule in coordinate_rule_violations(latitudes, longitudes):  # the first rule a row breaks names it
        for row in np.flatnonzero(bad):
            reasons.setdefault(int(row), rule)
    return [(row, f"row {row}: ({latitudes[row]}, {longitudes[row]}): {reasons[row]} (degrees, (latitude, "
                  "longitude) order).") for row in sorted(reasons)]


def _has_valid_coordinates(batch: dict) -> list[bool]:
    """Batched streaming filter: keep the rows whose coordinates validate, warn once per dropped row."""
    bad = invalid_coordinate_rows(batch[LATITUDE], batch[LONGITUDE])
    for _, reason in bad:
        logger.warning(f"Skipping a row with invalid coordinates: {reason}")
    keep = [True] * len(batch[LATITUDE])
    for row, _ in bad:
        keep[row] = False
    return keep


def load_geo_dataset(
    source: str,
    split: str = "train",
    *,
    image_column: str = IMAGE,
    lat_column: str = LATITUDE,
    lon_column: str = LONGITUDE,
    streaming: bool = False,
    coordinates: bool = True,
):
    """Load a geolocation dataset with canonical columns `image` (undecoded), `latitude`, `longitude`.

    Args:
        source: an image folder with `metadata.csv` (`file_name,latitude,longitude`; `train/`, `test/`
            subfolders become splits), a `.parquet`/`.tar` (webdataset) shard, a glob or folder of shards,
            a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or a Hugging Face Hub
            dataset id.
        split: which split to read.
        image_column, lat_column, lon_column: the source's names for the image and coordinates.
        streaming: return an `IterableDataset` (rows are checked as they stream by) instead of a `Dataset`.
        coordinates: False for photos to geolocate: only the image column is needed and renamed, an image
            folder may lack metadata.csv, and every row is kept (coordinates, if any, are neither checked nor
            renamed; `lat_column`/`lon_column` are ignored).

    Returns:
        `datasets.Dataset` or `datasets.IterableDataset`. The `image` column is cast to
        `Image(decode=False)` (dicts with `bytes`/`path`); decode with `decode_image` or `GeoCollator`.
        Latitudes/longitudes are float64. Other columns are kept. Rows with invalid coordinates are dropped
        and counted in one warning.

    Raises:
        ValueError: when the source cannot be read or a named column is missing.

    Example:
        >>> ds = load_geo_dataset("data/worldmap", split="test")  # doctest: +SKIP
        >>> ds.column_names  # doctest: +SKIP
        ['image', 'latitude', 'longitude']
    """
    dataset, roots = _load_raw(os.fspath(source), split, streaming, coordinates)
    renames = {image_column: IMAGE, lat_column: LATITUDE, lon_column: LONGITUDE} if coordinates else {
        image_column: IMAGE}
    dataset = _canonical_names(dataset, renames)
    dataset = dataset.cast_column(IMAGE, ImageFeature(decode=False))
    if roots is not None:
        dataset = confine_image_paths(dataset, roots, source)
    if not coordinates:
        return dataset
    if streaming:
        return dataset.filter(_has_valid_coordinates, batched=True, batch_size=1000)
    columns = dataset.with_format("pandas")  # whole columns at once (`dataset[name]` iterates row by row)
    bad = invalid_coordinate_rows(columns[LATITUDE], columns[LONGITUDE])
    if bad:
        logger.warning(
            f"Skipping {len(bad)} of {len(dataset)} rows with invalid coordinates in '{source}' ({split}); "
            f"first: {bad[0][1]}"
        )
        keep = np.ones(len(dataset), dtype=bool)
        keep[[row for row, _ in bad]] = False
        dataset = dataset.select(np.flatnonzero(keep))
    for column in (LATITUDE, LONGITUDE):
        if dataset.features[column] != datasets.Value("float64"):
            dataset = dataset.cast_column(column, datasets.Value("float64"))
    return dataset


def decode_image(value, max_pixels: int = MAX_IMAGE_PIXELS, resize_edge: int | None = None):
    """Decode one `image` cell (a `{"bytes", "path"}` dict from `Image(decode=False)`, a path, bytes or a
    PIL image) into an RGB PIL image with `geo_core.load_image`.

    Args:
        max_pixels: images with more pixels are refused before decoding (see `load_image`).
        resize_edge: the short edge the image processor resizes to: images whose resize would exceed
            `max_pixels` are refused before decoding too (see `image_limits`).

    Raises:
        ValueError: naming the file when it is missing, corrupt, not an image or too large.
    """
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
        if value is None:
            raise ValueError("Image cell has neither bytes nor a path (paths outside the dataset are not read).")
    return load_image(value, max_pixels, resize_edge)


def image_limits(image_processor) -> dict:
    """`{"max_pixels", "resize_edge"}` of an image processor (a `GeoImageProcessor`'s own; defaults for others),
    so that images are decoded once, with the limits the processor would apply."""
    return {"max_pixels": getattr(image_processor, "max_image_pixels", MAX_IMAGE_PIXELS),
            "resize_edge": getattr(image_processor, "resize_edge", None)}


def decode_images(
    cells: Sequence, max_pixels: int = MAX_IMAGE_PIXELS, resize_edge: int | None = None
) -> tuple[list, list[int], list[tuple[int, str]]]:
    """Decode a batch of `image` cells, skipping the unreadable ones with a warning, never raising for a
    bad file (`load_image` turns every decoder failure into a ValueError; MemoryError still propagates).

    Returns: `(images, kept, errors)`: the RGB PIL images, the positions in `cells` they came from, and
    `(position, message)` for every cell that could not be read.
    """
    images, kept, errors = [], [], []
    for position, cell in enumerate(cells):
        try:
            images.append(decode_image(cell, max_pixels, resize_edge))
        except ValueError as error:
            logger.warning(f"Skipping an unreadable image: {error}")
            errors.append((position, str(error)))
            continue
        kept.append(position)
    return images, kept, errors


class GeoCollator:
    """Turn a list of dataset rows into a training batch, skipping (and counting) unreadable images.

    Returns a dict with `pixel_values` `(B, 3, H, W)` float, `locations` `(B, 2)` float64 (lat, lon), one `(B,)`
    or `(B, L)` long tensor per name in `label_columns` (e.g. geocell labels, scene labels), and `unreadable`
    (int): how many rows were skipped because their image could not be decoded. `B` may be smaller than the
    number of rows when images were skipped, and 0 when all of them were.

    With `augment` (see `geoloc.training.augment`), each decoded image is augmented before the processor (which then only
    normalises, when the augmentation has a `size`: its images already have the tower's size) with a random
    generator seeded by `(seed, epoch, the image's bytes or file name)`: set `epoch` before each epoch (the training
    loop does), and an image gets the same augmentation in a resumed run as in an uninterrupted one, in the main
    process or in DataLoader workers.

    Args:
        image_processor: a `GeoCLIPImageProcessor` (or any image processor taking PIL images); its
            limits (`image_limits`) also bound decoding.
        label_columns: integer columns passed through as tensors.
        augment: `(image, rng) -> image`, or None.
        seed: the run's seed for `augment`.

    Example:
        >>> collate = GeoCollator(GeoCLIPImageProcessor(size={"shortest_edge": 32},
        ...                       crop_size={"height": 32, "width": 32}))  # doctest: +SKIP
    """

    def __init__(self, image_processor, label_columns: Sequence[str] = (), augment=None, seed: int = 0):
        self.image_processor = image_processor
        self.label_columns = tuple(label_columns)
        self.augment, self.seed, self.epoch = augment, seed, 0
        self.limits = image_limits(image_processor)

    def __call__(self, rows: list[dict]) -> dict:
        cells = [row[IMAGE] for row in rows]
        images, positions, errors = decode_images(cells, **self.limits)
        kept = [rows[position] for position in positions]
        if self.augment is not None:
            images = [self.augment(image, self._generator(cells[position])) for image, position in zip(images, positions)]
        if images:
            # An augmentation hands over images at the tower's size: the processor's resize and crop are for evaluation.
            geometry = {} if self.augment is None or getattr(self.augment, "size", None) is None else {
                "do_resize": False, "do_center_crop": False}
            pixel_values = self.image_processor(images, return_tensors="pt", **geometry).pixel_values
        else:
            size = self.image_processor.crop_size
            pixel_values = torch.zeros(0, 3, size["height"], size["width"])
        batch = {
            "pixel_values": pixel_values,
            "locations": torch.tensor([[row[LATITUDE], row[LONGITUDE]] for row in kept],
                                      dtype=torch.float64).reshape(-1, 2),
            "unreadable": len(errors),
        }
        for column in self.label_columns:
            batch[column] = torch.tensor([row[column] for row in kept], dtype=torch.long)
        return batch

    def _generator(self, cell) -> np.random.Generator:
        """The augmentation generator of one image this epoch: a function of the seed, the epoch and the image's
        bytes, or its file name (not the folder: a copy of the data elsewhere trains the same)."""
        if isinstance(cell, dict):
            cell = cell.get("bytes") or cell.get("path") or b""
        if isinstance(cell, (bytes, bytearray)):
            identity = bytes(cell)
        elif isinstance(cell, (str, os.PathLike)):
            identity = os.path.basename(os.fspath(cell)).encode()
        else:  # an image object (PIL image, array)
            identity = np.asarray(cell).tobytes()
        return np.random.default_rng([self.seed, self.epoch, zlib.crc32(identity)])


__all__ = [
    "CANONICAL_COLUMNS",
    "GeoCollator",
    "check_no_outside_links",
    "confine_image_paths",
    "confined_path",
    "decode_image",
    "decode_images",
    "image_limits",
    "invalid_coordinate_rows",
    "load_geo_dataset",
]
