"""World-map crops: a small, honest geolocation task that trains on a CPU in minutes.

Each example is a small crop of the Natural Earth I shaded-relief map (public domain, bundled in
`geoloc/assets/worldmap/`, plate carrée at 0.5° per pixel) centred on a known coordinate, upsampled to
`size`x`size` pixels with light augmentation (a jitter of the window by up to `jitter` map pixels and a
brightness factor). Deserts, forests, ice, coastlines and ocean depth make regions visually distinct, so a
model can learn where a crop comes from; the label is the crop's centre coordinate.

Points are drawn uniformly on the sphere, a `land_fraction` of them resampled until they fall on land
(ocean crops far from any coast all look alike). Train and test points come from one seeded stream, so
they never coincide.

Command line (`geoloc worldmap`) writes an image folder per split with a `metadata.csv`, readable by
`geoloc.data.dataset.load_geo_dataset` and `geoloc.training.train --dataset`:

    geoloc worldmap --output-dir data/worldmap --train 2000 --test 500
"""

import argparse
import csv
import os
from functools import lru_cache
from importlib import resources

import datasets
import numpy as np
from PIL import Image, ImageEnhance

from ..cli import HelpFormatter
from ..geography.geodesy import uniform_sphere_points, validate_lat_lon

MAP_FILE = "natural-earth-50m-shaded-relief-720x360.png"
DEGREES_PER_PIXEL = 0.5


@lru_cache(maxsize=1)
def load_world_map() -> np.ndarray:
    """The bundled shaded-relief map as a read-only (360, 720, 3) uint8 array, row 0 at latitude 90°."""
    with resources.files("geoloc").joinpath("assets", "worldmap", MAP_FILE).open("rb") as handle:
        array = np.asarray(Image.open(handle).convert("RGB"))
    array.setflags(write=False)
    return array


def coordinates_to_pixels(latitudes, longitudes) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) degrees -> fractional map (row, col); pixel (col, row) covers lon -180+0.5*col..,
    lat 90-0.5*row.., so integer parts index the pixel that contains the point.

    Example:
        >>> coordinates_to_pixels([90.0], [-180.0])
        (array([0.]), array([0.]))
    """
    latitudes, longitudes = validate_lat_lon(latitudes, longitudes)
    return (90.0 - latitudes) / DEGREES_PER_PIXEL, (longitudes + 180.0) / DEGREES_PER_PIXEL


def is_land(latitudes, longitudes) -> np.ndarray:
    """True where the map pixel under each point is land or ice (not blue water): (N,) bool."""
    world = load_world_map()
    rows, cols = coordinates_to_pixels(latitudes, longitudes)
    rows = np.clip(rows.astype(int), 0, world.shape[0] - 1)
    cols = np.clip(cols.astype(int), 0, world.shape[1] - 1)
    pixels = world[rows, cols].astype(int)
    return pixels[:, 2] - pixels[:, 0] < 40  # water is much bluer than red; land and ice are not


def sample_points(count: int, rng: np.random.Generator, land_fraction: float = 0.75) -> np.ndarray:
    """Draw `count` (lat, lon) points: uniform on the sphere, a `land_fraction` of them on land only.

    Returns: float64 array of shape (count, 2), degrees.
    """
    if count < 0 or not 0.0 <= land_fraction <= 1.0:
        raise ValueError(f"Need count >= 0 and 0 <= land_fraction <= 1, got {count} and {land_fraction}.")
    points = uniform_sphere_points(count, rng)
    wants_land = rng.random(count) < land_fraction
    while (todo := np.flatnonzero(wants_land & ~is_land(points[:, 0], points[:, 1]))).size:
        points[todo] = uniform_sphere_points(todo.size, rng)
    return points


def render_crop(latitude: float, longitude: float, rng: np.random.Generator, *, window: int = 16,
                size: int = 32, jitter: float = 1.0, brightness: float = 0.1) -> Image.Image:
    """A `size`x`size` RGB crop of a `window`x`window`-pixel map window centred on (latitude, longitude).

    The window wraps around in longitude and is clamped at the poles; its centre is shifted by up to
    `jitter` map pixels and its brightness scaled by a factor in [1 - brightness, 1 + brightness].
    """
    world = load_world_map()
    height, width = world.shape[:2]
    rows, cols = coordinates_to_pixels([latitude], [longitude])
    row, col = rows[0] + rng.uniform(-jitter, jitter), cols[0] + rng.uniform(-jitter, jitter)
    top = int(round(np.clip(row - window / 2, 0, height - window)))
    left = int(round(col - window / 2))
    patch = world[top : top + window].take(np.arange(left, left + window) % width, axis=1)
    image = Image.fromarray(patch).resize((size, size), Image.Resampling.BILINEAR)
    return ImageEnhance.Brightness(image).enhance(rng.uniform(1 - brightness, 1 + brightness))


def overlaps_window(points: np.ndarray, others: np.ndarray, window_degrees: float) -> np.ndarray:
    """True for each of `points` (N, 2) whose crop window (`window_degrees` wide, centred on the point) overlaps the
    window of any of `others` (M, 2): centres less than a window apart in latitude and in (wrapped) longitude."""
    if len(others) == 0:
        return np.zeros(len(points), dtype=bool)
    latitude_gap = np.abs(points[:, None, 0] - others[None, :, 0])
    longitude_gap = np.abs((points[:, None, 1] - others[None, :, 1] + 180) % 360 - 180)
    return ((latitude_gap < window_degrees) & (longitude_gap < window_degrees)).any(axis=1)


def build_worldmap_splits(train: int, test: int, *, seed: int = 0, land_fraction: float = 0.75,
                          window: int = 16, size: int = 32, validation: int = 0,
                          buffered: bool = False) -> datasets.DatasetDict:
    """World-map crops as a `DatasetDict` with `train`, `test` and (when `validation` > 0) `validation` splits
    (disjoint points), columns `image` (PIL), `latitude`, `longitude` (float64 degrees).

    `buffered=True` makes a spatially buffered split: the held-out points are drawn first and every training crop's
    window is kept clear of theirs (centres at least one window apart in latitude or longitude), so no held-out
    crop shares a pixel of the map with a training crop; a lookup of the training crops cannot copy the answer.

    Example:
        >>> splits = build_worldmap_splits(100, 20, seed=0, validation=10)
        >>> splits["test"].num_rows, splits["validation"].num_rows
        (20, 10)
    """
    rng = np.random.default_rng(seed)
    if buffered:
        held_out = sample_points(test + validation, rng, land_fraction)
        training = np.zeros((0, 2))
        while len(training) < train:
            candidates = sample_points(train, rng, land_fraction)
            kept = candidates[~overlaps_window(candidates, held_out, window * DEGREES_PER_PIXEL)]
            training = np.concatenate([training, kept])[:train]
        points = np.concatenate([training, held_out])
    else:
        points = sample_points(train + test + validation, rng, land_fraction)
    features = datasets.Features({
        "image": datasets.Image(), "latitude": datasets.Value("float64"), "longitude": datasets.Value("float64"),
    })
    splits = {}
    bounds = {"train": (0, train), "test": (train, train + test), "validation": (train + test, len(points))}
    for name, (start, end) in bounds.items():
        if name == "validation" and not validation:
            continue
        chunk = points[start:end]
        images = [render_crop(lat, lon, rng, window=window, size=size) for lat, lon in chunk]
        splits[name] = datasets.Dataset.from_dict(
            {"image": images, "latitude": chunk[:, 0], "longitude": chunk[:, 1]}, features=features)
    return datasets.DatasetDict(splits)


def write_imagefolder(splits: datasets.DatasetDict, output_dir: str) -> None:
    """Write each split as `output_dir/<split>/<index>.png` plus `metadata.csv`
    (`file_name,latitude,longitude`), the layout `load_geo_dataset(output_dir, split=...)` reads."""
    for name, split in splits.items():
        if len(split) == 0:
            continue
        folder = os.path.join(output_dir, name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "metadata.csv"), "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file_name", "latitude", "longitude"])
            for index, row in enumerate(split):
                file_name = f"{index:06d}.png"
                row["image"].save(os.path.join(folder, file_name))
                writer.writerow([file_name, repr(row["latitude"]), repr(row["longitude"])])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geoloc worldmap",
        description="Build the world-map crops dataset (Natural Earth shaded relief, public domain) as an "
                    "image folder with train/ and test/ splits and metadata.csv.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--output-dir", required=True, help="folder to write train/ and test/ into")
    parser.add_argument("--train", type=int, default=2000, help="number of training crops")
    parser.add_argument("--test", type=int, default=500, help="number of test crops (disjoint points)")
    parser.add_argument("--validation", type=int, default=0,
                        help="number of validation crops (disjoint points), for every tuning choice")
    parser.add_argument("--buffered", action="store_true",
                        help="spatially buffered split: no training crop's window overlaps a held-out crop's")
    parser.add_argument("--seed", type=int, default=0, help="seed of the points, crops and jitter")
    parser.add_argument("--land-fraction", type=float, default=0.75,
                        help="fraction of points drawn on land only; the rest are uniform on the sphere")
    parser.add_argument("--window", type=int, default=16, help="crop window on the map, in map pixels (0.5°)")
    parser.add_argument("--size", type=int, default=32, help="output image side in pixels")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.train < 1 or args.test < 0 or args.validation < 0:
        raise ValueError(f"need --train >= 1, --test >= 0 and --validation >= 0, got {args.train}, {args.test}, "
                         f"{args.validation}.")
    splits = build_worldmap_splits(args.train, args.test, seed=args.seed, land_fraction=args.land_fraction,
                                   window=args.window, size=args.size, validation=args.validation,
                                   buffered=args.buffered)
    write_imagefolder(splits, args.output_dir)
    counts = ", ".join(f"{len(split)} {name}" for name, split in splits.items())
    print(f"Wrote {counts} crops to {args.output_dir}")
    return 0


if __name__ == "__main__":
    from ..cli import run_command

    run_command("worldmap")
