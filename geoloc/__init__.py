"""geoloc: everything around the models (CLI, data, geodesy, geocells, inference, training, evaluation, publishing).

Importing `geoloc` loads neither torch nor transformers (so `geoloc --help` answers at once). The inference
adapter is loaded on first use: `from geoloc import Geolocator` (see `geoloc.inference.adapter`).
`geoloc.models.register_models()` (called by every entry point that loads checkpoints, the adapter included)
registers GeoCLIP, GeoHier and the `image-geolocation` pipeline with the transformers Auto classes; importing
`geoloc.pipeline` calls it.

`DEFAULT_MODEL` is the bundled toy model's folder as an absolute path: pass it to `Geolocator.from_pretrained`,
`AutoModel.from_pretrained` or `--model` from any folder (`--model default` means the same).

Example:
    >>> from geoloc import DEFAULT_MODEL, Geolocator
    >>> geolocator = Geolocator.from_pretrained(DEFAULT_MODEL)  # doctest: +SKIP
    >>> geolocator.locate_images(["photo.jpg"], top_k=3)[0].latitudes  # doctest: +SKIP
"""

import importlib
from pathlib import Path

__version__ = "0.1.0"

# The bundled tiny world-map GeoCLIP (a toy trained on Natural Earth map crops: see its README.md).
DEFAULT_MODEL = str(Path(__file__).resolve().parent / "assets" / "geoclip-worldmap-tiny")

# Public names loaded on first access, so that `import geoloc` stays light.
_LAZY = {
    "Capabilities": "geoloc.inference.adapter",
    "GeolocationResult": "geoloc.inference.adapter",
    "Geolocator": "geoloc.inference.adapter",
    "ImageGeolocationPipeline": "geoloc.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'geoloc' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = ["DEFAULT_MODEL", *_LAZY]
