"""The official GeoCLIP code (PyPI `geoclip==1.3.0`) as a reference for the parity test and the benchmarks.

The wheel is fetched from PyPI with `pip download --no-deps` into a cache folder (`DEFAULT_CACHE`:
`$GEOLOC_CACHE/wheels`, default `~/.cache/geoloc/wheels`), unpacked next to it, and its `model/` modules are
imported under stub packages: neither `geoclip/__init__.py` (which pulls in the training code) nor the wheel's
dependencies are installed. Needs pandas (imported by `model/misc.py`).

`python tests/official_geoclip.py` fetches it and prints its path: CI (`.ci/run`) does so before the tests,
which only read the cache (the parity test is skipped, saying so, when the wheel is not there).
"""

import importlib
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

OFFICIAL_VERSION = "1.3.0"
WHEEL_NAME = f"geoclip-{OFFICIAL_VERSION}-py3-none-any.whl"
DEFAULT_CACHE = Path(os.environ.get("GEOLOC_CACHE", Path.home() / ".cache" / "geoloc")) / "wheels"


def cached_official_wheel(cache_dir: str | os.PathLike = DEFAULT_CACHE) -> Path | None:
    """The path of the `geoclip==1.3.0` wheel in `cache_dir`, or None when it has not been fetched."""
    wheel = Path(cache_dir) / WHEEL_NAME
    return wheel if wheel.is_file() else None


def fetch_official_wheel(cache_dir: str | os.PathLike = DEFAULT_CACHE) -> Path:
    """Return the path of the `geoclip==1.3.0` wheel, downloading it with pip into `cache_dir` if absent.

    Raises:
        RuntimeError: when pip cannot download it (no network), with pip's last output lines.
    """
    cached = cached_official_wheel(cache_dir)
    if cached is not None:
        return cached
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"geoclip=={OFFICIAL_VERSION}", "-d", str(cache_dir)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = cached_official_wheel(cache_dir)
    if result.returncode != 0 or wheel is None:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-3:])
        raise RuntimeError(f"pip could not download geoclip=={OFFICIAL_VERSION}: {tail}")
    return wheel


def unpack_official_wheel(wheel: str | os.PathLike) -> Path:
    """Unpack `wheel` once into a sibling folder and return the folder holding its `geoclip/` package."""
    wheel = Path(wheel)
    target = wheel.with_suffix("")
    marker = target / ".unpacked"
    if not marker.is_file():
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
        marker.touch()
    return target


def load_official_geoclip(wheel: str | os.PathLike) -> types.SimpleNamespace:
    """Import the official `geoclip.model` modules and the training loop from an unpacked `wheel` without
    running its `__init__`s (`geoclip/train/__init__.py` would import torchvision).

    Returns: a namespace with the classes `GeoCLIP`, `LocationEncoder`, `ImageEncoder`, the function `train`
    (`geoclip/train/train.py`: one epoch of the official loop), the modules `image_encoder_module` (whose
    `CLIPModel` a caller may replace) and `hub` (release reading), and `root` (the unpacked `geoclip/model`
    folder, holding `weights/` and `gps_gallery/`).

    Example:
        >>> official = load_official_geoclip(fetch_official_wheel())  # doctest: +SKIP
        >>> encoder = official.LocationEncoder()  # the released weights  # doctest: +SKIP
    """
    root = unpack_official_wheel(wheel) / "geoclip"
    for name, folder in (("geoclip", root), ("geoclip.model", root / "model"), ("geoclip.train", root / "train")):
        loaded = sys.modules.get(name)
        if loaded is not None and list(getattr(loaded, "__path__", [])) != [str(folder)]:
            raise RuntimeError(f"A different '{name}' package is already imported from {loaded.__path__}.")
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules.setdefault(name, package)
    location = importlib.import_module("geoclip.model.location_encoder")
    image = importlib.import_module("geoclip.model.image_encoder")
    return types.SimpleNamespace(
        GeoCLIP=importlib.import_module("geoclip.model.GeoCLIP").GeoCLIP,
        LocationEncoder=location.LocationEncoder,
        ImageEncoder=image.ImageEncoder,
        train=importlib.import_module("geoclip.train.train").train,
        image_encoder_module=image,
        hub=importlib.import_module("geoclip.model._hub"),
        root=root / "model",
    )


__all__ = ["DEFAULT_CACHE", "OFFICIAL_VERSION", "cached_official_wheel", "fetch_official_wheel",
           "load_official_geoclip", "unpack_official_wheel"]


if __name__ == "__main__":
    try:
        print(fetch_official_wheel())
    except RuntimeError as error:
        sys.exit(f"official_geoclip: error: {' '.join(str(error).split())}")
