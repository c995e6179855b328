"""`geoloc space OUTPUT_DIR`: assemble the Gradio Space (`spaces/geolocation/`) in a folder ready to upload.

The Space's page (answers, map, tables) lives in `spaces/geolocation/` and talks to the models only through
`geoloc.inference.adapter`; this module only copies it, with the package sources it imports, so that the Space runs
without `geoloc` being installed (`app.py` imports the copied folders next to it; `requirements.txt` installs
their dependencies). Only source and asset files are copied (the package-data patterns of pyproject.toml), never
caches, compiled files or hidden files.

Example:
    >>> export_space("build/space")  # doctest: +SKIP
    PosixPath('build/space')
"""

import argparse
import fnmatch
import os
import shutil
from pathlib import Path

from ..cli import HelpFormatter
from ..models import MODEL_PACKAGES

REPOSITORY = Path(__file__).resolve().parents[2]
SPACE_SOURCE = REPOSITORY / "spaces" / "geolocation"
PACKAGES = ("geoloc", "geo_core", *MODEL_PACKAGES)
COPIED = ("*.py", "*.md", "*.txt", "*.json", "*.csv", "*.png", "*.jpg", "*.safetensors")  # what a Space needs


def _copy_sources(source: Path, destination: Path) -> None:
    """Copy the files of `source` that match `COPIED`, skipping hidden files and folders and `__pycache__`."""
    for folder, subfolders, files in os.walk(source):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            if name.startswith(".") or not any(fnmatch.fnmatch(name, pattern) for pattern in COPIED):
                continue
            target = destination / Path(folder).relative_to(source) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(folder) / name, target)


def export_space(output_dir: str | os.PathLike) -> Path:
    """Copy the Space (`spaces/geolocation/`) and the package sources it imports into `output_dir`.

    Raises:
        ValueError: when `output_dir` is not empty, or geoloc is not a source checkout (no `spaces/`).
    """
    output_dir = Path(output_dir)
    if not SPACE_SOURCE.is_dir():
        raise ValueError(f"{SPACE_SOURCE} does not exist: run `geoloc space` from a source checkout of geoloc.")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ValueError(f"{output_dir} is not empty: give a new or empty folder.")
    _copy_sources(SPACE_SOURCE, output_dir)
    for package in PACKAGES:
        _copy_sources(REPOSITORY / package, output_dir / package)
    return output_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geoloc space",
        description="Assemble the Gradio Space (app, examples, requirements and the package sources) in a "
        "folder ready to upload, e.g. `hf upload USER/SPACE OUTPUT_DIR --repo-type space`.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("output_dir", help="new or empty folder to write the Space into")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    print(f"Space written to {export_space(args.output_dir)}")
    return 0
