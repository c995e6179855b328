"""Loaders for the standard geolocation benchmarks: Im2GPS, Im2GPS3k, YFCC4k, YFCC26k, GWS15k, OSV-5M.

`load_benchmark(name, data_dir)` reads a local copy in the set's original layout (an image folder plus the
CSV the set ships) and returns a `datasets.Dataset` with the columns of `geoloc.data.dataset.load_geo_dataset`:
`image` (`Image(decode=False)`: a path, decoded later by `geoloc.data.dataset.decode_image`), `latitude`,
`longitude` (float64 degrees), plus `id` (the image id of the CSV). Only OSV-5M has an official Hub copy;
with `data_dir=None` it is downloaded (test split only) with `huggingface_hub.snapshot_download`. The
others must be fetched by hand from the sources below, then pointed at with `data_dir`.

Rows whose image file is missing are kept (with the path where the file was expected) so that
`geoloc evaluate` counts and reports them as unreadable instead of silently shrinking the benchmark.

Paths stay inside the benchmark's image folder: an image id that is absolute or leaves the folder through
`..` (e.g. `../../secret/x.png`), or a symbolic link in the folder pointing outside it, makes `load_benchmark`
raise a `ValueError` naming it (the CSV or the folder is broken or hostile; nothing outside is read).

Sources (checked 2025; image counts as in the papers):

| name | images | from | images: where | metadata CSV (columns) | local layout read here |
| --- | --- | --- | --- | --- | --- |
| `im2gps` | 237 | Hays & Efros, CVPR 2008 | im2gps project page (CMU), test query images | `meta/im2gps_places365.csv` in TIBHannover/GeoEstimation (`IMG_ID`, `LAT`, `LON`) | `im2gps_places365.csv` + `images/` (or `gps_query_imgs/`) |
| `im2gps3k` | 2,997 | Vo, Jacobs & Hays, ICCV 2017 | `im2gps3ktest.zip` linked from lugiavn/revisiting-im2gps | `meta/im2gps3k_places365.csv` in TIBHannover/GeoEstimation (`IMG_ID`, `AUTHOR`, `LAT`, `LON`, ...); also in the Hub model repo `Jia-py/G3-checkpoint` | `im2gps3k_places365.csv` + `images/` (or `im2gps3ktest/`) |
| `yfcc4k` | 4,536 | Vo, Jacobs & Hays, ICCV 2017 | `yfcc4k.zip` linked from lugiavn/revisiting-im2gps | `yfcc4k_places365.csv` (`IMG_ID`, `LAT`, `LON`) in `Jia-py/G3-checkpoint`; or GeoEstimation's `yfcc25600_places365.csv`, restricted to the images present | `yfcc4k_places365.csv` (or `yfcc25600_places365.csv`) + `images/` (or `yfcc4k/`) |
| `yfcc26k` | 25,600 | Müller-Budack et al., ECCV 2018 | Flickr URLs `yfcc25600_urls.csv` + `download_images.py` in TIBHannover/GeoEstimation (some photos are gone) | `yfcc25600_places365.csv` (GeoEstimation release `pytorch`) | `yfcc25600_places365.csv` + `images/` (or `yfcc25600/`) |
| `gws15k` | 14,955 | Clark et al. (GeoDecoder), CVPR 2023 | not released (Google Street View terms) | — | `gws15k.csv` (`IMG_ID`/`id`, `LAT`/`latitude`, `LON`/`longitude`) + `images/` |
| `osv5m` | 210,122 (test) | Astruc et al., CVPR 2024 | Hub dataset `osv5m/osv5m` (CC-BY-SA 4.0): `images/test/00.zip` ... `04.zip` | `test.csv` (`id`, `latitude`, `longitude`, ...) | `test.csv` + `images/test/**/<id>.jpg` (zips are extracted on first load) |

No verified public Hub copy of Im2GPS, Im2GPS3k, YFCC4k or YFCC26k *images* exists; community uploads
come and go, so `data_dir` is required for them. GWS15k was never released: if you hold a copy (e.g.
rebuilt from Street View with the GeoDecoder authors' list), lay it out as `DIR/gws15k.csv` with one row
per image (`IMG_ID,LAT,LON`, the image's file name relative to `DIR/images/`) and `DIR/images/`, then run
`geoloc evaluate --dataset gws15k --data-dir DIR`.

An older revision of GeoEstimation's `im2gps3k_places365.csv` names the columns `LON,LAT` in the wrong
order (the `LON` column holds latitudes); the loader then fails on the first longitude beyond ±90° read as
a latitude. Use the current file.

Example:
    >>> ds = load_benchmark("im2gps3k", data_dir="data/im2gps3k")  # doctest: +SKIP
    >>> ds.column_names  # doctest: +SKIP
    ['id', 'image', 'latitude', 'longitude']
"""

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import pandas as pd
from huggingface_hub import snapshot_download
from huggingface_hub.constants import HF_HOME

from .dataset import check_no_outside_links, confined_path
from ..geography.geodesy import validate_lat_lon

# Accepted column names, first match wins (the CSVs of the im2gps family use upper case, OSV-5M lower).
ID_COLUMNS = ("IMG_ID", "id")
LAT_COLUMNS = ("LAT", "latitude", "lat")
LON_COLUMNS = ("LON", "longitude", "lon")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark's files live inside its folder, and where it comes from.

    Attributes:
        title: the name papers use.
        csv_names: metadata CSV file names, in order of preference.
        image_dirs: image folders (relative to the benchmark folder), in order of preference.
        hub_repo: Hub dataset id of an official copy, or None.
        hub_patterns: the files of `hub_repo` this loader needs.
        subset_csv_names: CSVs that cover more images than the benchmark; with them, only rows whose
            image is present are kept.
    """

    title: str
    csv_names: tuple[str, ...]
    image_dirs: tuple[str, ...]
    hub_repo: str | None = None
    hub_patterns: tuple[str, ...] = ()
    subset_csv_names: tuple[str, ...] = ()


BENCHMARKS = {
    "im2gps": Benchmark("Im2GPS", ("im2gps_places365.csv",), ("images", "gps_query_imgs")),
    "im2gps3k": Benchmark("Im2GPS3k", ("im2gps3k_places365.csv",), ("images", "im2gps3ktest")),
    "yfcc4k": Benchmark(
        "YFCC4k", ("yfcc4k_places365.csv", "yfcc25600_places365.csv"), ("images", "yfcc4k"),
        subset_csv_names=("yfcc25600_places365.csv",),
    ),
    "yfcc26k": Benchmark("YFCC26k", ("yfcc25600_places365.csv",), ("images", "yfcc25600")),
    "gws15k": Benchmark("GWS15k", ("gws15k.csv",), ("images",)),
    "osv5m": Benchmark(
        "OSV-5M", ("test.csv",), ("images/test",),
        hub_repo="osv5m/osv5m", hub_patterns=("test.csv", "images/test/*.zip"),
    ),
}


def _pick(names, candidates, what: str, where) -> str:
    for candidate in candidates:
        if candidate in names:
            return candidate
    raise ValueError(f"{where} has no {what} column: expected one of {list(candidates)}, found {list(names)}.")


def _first_existing(folder: Path, names: tuple[str, ...], what: str, benchmark: str) -> Path:
    """The first of `names` in `folder`, refused when a symbolic link takes it outside `folder`."""
    for name in names:
        if (folder / name).exists():
            return Path(confined_path(folder, name, what=f"The {what}"))
    raise ValueError(
        f"'{folder}' is not a {benchmark} folder: no {what} ({' or '.join(names)}). "
        f"See `geoloc.data.benchmarks` for the expected layout and where to get the files."
    )


def _extract_archives(image_dir: Path) -> None:
    """Extract the zip shards of a downloaded image folder once (a marker file records it)."""
    marker = image_dir / ".geoloc-extracted"
    archives = sorted(image_dir.glob("*.zip"))
    if not archives or marker.exists():
        return
    for archive in archives:
        with zipfile.ZipFile(archive) as handle:
            handle.extractall(image_dir)
    marker.touch()


def _image_index(image_dir: Path) -> dict[str, str]:
    """Map each image under `image_dir` (recursively) by relative path, file name and stem to its path."""
    index = {}
    for root, _, files in os.walk(image_dir):
        for name in files:
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(root, name)
            for key in (os.path.relpath(path, image_dir), name, os.path.splitext(name)[0]):
                index.setdefault(key, path)
    return index


def _expected_path(image_dir: Path, image_id, csv_path: Path, row: int) -> str:
    """Where the image of a CSV row should be when it was not found: inside `image_dir`, or a ValueError."""
    try:
        return confined_path(image_dir, str(image_id))
    except ValueError as error:
        raise ValueError(f"'{csv_path}' row {row}: {error}") from None


def benchmark_dir(name: str) -> Path:
    """Default download folder of a Hub-hosted benchmark: `$HF_HOME/geoloc-benchmarks/<name>`."""
    return Path(HF_HOME) / "geoloc-benchmarks" / name


def download_benchmark(name: str, data_dir=None) -> Path:
    """Download the files a benchmark needs from its official Hub copy into `data_dir` (or
    `benchmark_dir(name)`), in the original layout, and return the folder.

    Raises:
        ValueError: for an unknown name or a benchmark without a public Hub copy.
    """
    spec = _spec(name)
    if spec.hub_repo is None:
        raise ValueError(
            f"{name} has no public Hugging Face Hub copy: download it by hand (see the table in "
            f"`geoloc.data.benchmarks`) and pass its folder as data_dir (--data-dir)."
        )
    target = Path(data_dir) if data_dir is not None else benchmark_dir(name)
    snapshot_download(
        repo_id=spec.hub_repo, repo_type="dataset", allow_patterns=list(spec.hub_patterns), local_dir=target
    )
    return target


def _spec(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}: choose one of {sorted(BENCHMARKS)}.")
    return BENCHMARKS[name]


def load_benchmark(name: str, data_dir=None) -> datasets.Dataset:
    """Load a benchmark as a `datasets.Dataset` with `id`, `image` (undecoded path), `latitude`, `longitude`.

    Args:
        name: one of `BENCHMARKS` (im2gps, im2gps3k, yfcc4k, yfcc26k, gws15k, osv5m).
        data_dir: the benchmark's folder in its original layout (see the module docstring). When None,
            a benchmark with an official Hub copy (OSV-5M) is downloaded first; the others raise.

    Raises:
        ValueError: for an unknown name, a folder without the expected CSV / image folder / columns,
            invalid coordinates (naming the CSV and the row), an image id outside the image folder (naming the
            row) or a symbolic link in it pointing outside.

    Example:
        >>> ds = load_benchmark("osv5m", data_dir="datasets/osv5m")  # doctest: +SKIP
    """
    spec = _spec(name)
    folder = Path(data_dir) if data_dir is not None else download_benchmark(name)
    if not folder.is_dir():
        raise ValueError(f"--data-dir '{folder}' ({name}): no such folder.")
    csv_path = _first_existing(folder, spec.csv_names, "metadata CSV", name)
    image_dir = _first_existing(folder, spec.image_dirs, "image folder", name)
    _extract_archives(image_dir)

    header = pd.read_csv(csv_path, nrows=0).columns
    id_column = _pick(header, ID_COLUMNS, "image id", csv_path)
    lat_column = _pick(header, LAT_COLUMNS, "latitude", csv_path)
    lon_column = _pick(header, LON_COLUMNS, "longitude", csv_path)
    table = pd.read_csv(csv_path, usecols=[id_column, lat_column, lon_column], dtype={id_column: str})
    latitudes, longitudes = validate_lat_lon(table[lat_column], table[lon_column], name=f"'{csv_path}' rows")

    check_no_outside_links(image_dir)
    index = _image_index(image_dir)
    ids = table[id_column].tolist()
    found = [index.get(image_id) for image_id in ids]
    keep = [path is not None for path in found] if csv_path.name in spec.subset_csv_names else [True] * len(ids)
    paths = [path or _expected_path(image_dir, image_id, csv_path, row)
             for row, (path, image_id) in enumerate(zip(found, ids))]
    rows = [row for row, kept in enumerate(keep) if kept]
    features = datasets.Features({
        "id": datasets.Value("string"),
        "image": datasets.Image(decode=False),
        "latitude": datasets.Value("float64"),
        "longitude": datasets.Value("float64"),
    })
    return datasets.Dataset.from_dict(
        {
            "id": [ids[row] for row in rows],
            "image": [{"path": paths[row], "bytes": None} for row in rows],
            "latitude": latitudes[rows],
            "longitude": longitudes[rows],
        },
        features=features,
    )


__all__ = ["BENCHMARKS", "Benchmark", "benchmark_dir", "download_benchmark", "load_benchmark"]
