"""Hub remote code: the source files a model's repo carries, the `auto_map` entries that point transformers at
them, and the generated copies of the modules the model folders share.

A published repo loads with `AutoModel.from_pretrained(repo, trust_remote_code=True)` and
`AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)` in a Python without this package: it carries
the files of one model folder (`modeling_geoclip/` or `modeling_geohier/`) that its config, model and image
processor classes import, and `auto_map` in `config.json` (config, model) and `preprocessor_config.json` (image
processor). Remote code allows only relative imports inside the repo, so each model folder holds its own copy of
the shared modules (`SHARED_MODULES`); their single source is `geo_core/` (`SHARED_SOURCE`, neither model's
folder) and the copies in every model folder are generated:

    python geoloc/hub/remote_code.py --sync     # rewrite the copies from the source
    python geoloc/hub/remote_code.py --check    # exit 1 naming the copies that differ (also a test)

Run it as a file: the sync imports nothing but the standard library, so it works while a stale copy keeps the
model packages (and `geoloc`) from importing.
"""

import argparse
import importlib.util
import inspect
import sys
from pathlib import Path

if __package__:
    from ..models import MODEL_FAMILIES, MODEL_PACKAGES
else:  # run as a file (`--sync`): read the family list from its file, importing nothing of the packages
    _spec = importlib.util.spec_from_file_location("_geoloc_models", Path(__file__).resolve().parents[1] / "models.py")
    _models = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_models)
    MODEL_FAMILIES, MODEL_PACKAGES = _models.MODEL_FAMILIES, _models.MODEL_PACKAGES

SHARED_SOURCE = "geo_core"
SHARED_MODULES = ("geo_common.py", "geo_image_processing.py", "integrity.py", "pipeline_geolocation.py")
COPY_HEADER = "# Generated from {source} by `python geoloc/hub/remote_code.py --sync`; do not edit.\n"
# geoloc, geo_core, modeling_geoclip and modeling_geohier are installed side by side (a checkout or site-packages).
PACKAGES_ROOT = Path(__file__).resolve().parents[2]
# model_type -> the package and its (config, model, image processor) classes, for each publishable model.
AUTO_CLASSES = {family.model_type: (family.package, (family.config, family.model, family.image_processor))
                for family in MODEL_FAMILIES}


def _auto_classes(model_type: str) -> list[type]:
    import importlib

    if model_type not in AUTO_CLASSES:
        raise ValueError(f"No remote code for model type {model_type!r}; publishable types: {sorted(AUTO_CLASSES)}.")
    package, names = AUTO_CLASSES[model_type]
    return [getattr(importlib.import_module(package), name) for name in names]


def _reference(cls: type) -> str:
    """`module_file_stem.ClassName`, how `auto_map` names a class of the repo's own files."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def auto_maps(model_type: str) -> dict[str, dict[str, str]]:
    """The `auto_map` entry of each JSON file of a repo: `{"config.json": {...}, "preprocessor_config.json": {...}}`.

    Example:
        >>> auto_maps("geohier")["preprocessor_config.json"]
        {'AutoImageProcessor': 'image_processing_geohier.GeoHierImageProcessor'}
    """
    config_class, model_class, processor_class = _auto_classes(model_type)
    return {
        "config.json": {"AutoConfig": _reference(config_class), "AutoModel": _reference(model_class)},
        "preprocessor_config.json": {"AutoImageProcessor": _reference(processor_class)},
    }


def remote_code_files(model_type: str) -> dict[str, Path]:
    """The source files a `model_type` repo carries, `{file name: path}` (sorted): the modules of the config,
    model and image processor classes and everything they import relatively (as transformers resolves them).

    Raises:
        ValueError: for a model type without remote code, or a shared copy that differs from its source.
    """
    from transformers.dynamic_module_utils import get_relative_import_files

    files = set()
    package = AUTO_CLASSES[model_type][0]
    # The classes' modules, and the pipeline that `custom_pipelines` in config.json names (`pipeline_geolocation`).
    for module_file in [Path(inspect.getfile(cls)) for cls in _auto_classes(model_type)] + [
            PACKAGES_ROOT / package / "pipeline_geolocation.py"]:
        files.update(Path(path) for path in [module_file, *get_relative_import_files(module_file)])
    stale = [copy for copy in stale_shared_copies() if PACKAGES_ROOT / copy in files]
    if stale:
        raise ValueError(f"Shared module copies differ from their source: {stale}; run `python geoloc/hub/remote_code.py "
                         "--sync` in a checkout of the repository.")
    return {path.name: path for path in sorted(files)}


def expected_copy(name: str, root: Path = PACKAGES_ROOT) -> str:
    """The text a model folder's copy of shared module `name` must hold: a header naming the source, then the
    source byte for byte."""
    return COPY_HEADER.format(source=f"{SHARED_SOURCE}/{name}") + (root / SHARED_SOURCE / name).read_text("utf-8")


def _copies(root: Path) -> list[tuple[str, Path]]:
    return [(name, root / package / name) for package in MODEL_PACKAGES for name in SHARED_MODULES]


def stale_shared_copies(root: Path = PACKAGES_ROOT) -> list[str]:
    """Copies of the shared modules under `root` that are missing or differ from their source, as
    `package/file` (empty when all are in sync)."""
    return [path.relative_to(root).as_posix() for name, path in _copies(root)
            if not path.is_file() or path.read_bytes() != expected_copy(name, root).encode("utf-8")]


def sync_shared_copies(root: Path = PACKAGES_ROOT) -> list[str]:
    """Rewrite the stale copies of the shared modules under `root` from their source; returns what it rewrote."""
    stale = stale_shared_copies(root)
    for name, path in _copies(root):
        if path.relative_to(root).as_posix() in stale:
            path.write_bytes(expected_copy(name, root).encode("utf-8"))
    return stale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python geoloc/hub/remote_code.py",
                                     description="Check or regenerate the model folders' copies of the shared modules.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", action="store_true", help="exit 1 when a copy differs from its source")
    action.add_argument("--sync", action="store_true", help="rewrite the copies that differ")
    args = parser.parse_args(argv)
    if args.sync:
        print("\n".join(f"rewrote {path}" for path in sync_shared_copies()) or "all copies in sync")
        return 0
    stale = stale_shared_copies()
    if stale:
        print(f"stale copies (run `python geoloc/hub/remote_code.py --sync`): {', '.join(stale)}", file=sys.stderr)
        return 1
    print("all copies in sync")
    return 0


__all__ = ["AUTO_CLASSES", "SHARED_MODULES", "auto_maps", "remote_code_files", "stale_shared_copies",
           "sync_shared_copies"]

if __name__ == "__main__":
    sys.exit(main())
