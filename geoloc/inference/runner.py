"""The dataset runner: every image of a dataset geolocated into one prediction table, sharded over the
accelerate processes, in chunks written as they finish so that a killed run resumes. `geoloc predict --dataset`
is the runner; `geoloc evaluate` is the runner plus the metric (`evaluate.py`). Both write this schema:

- one row per image and rank, in dataset order: `PREDICTION_COLUMNS` = `id,rank,latitude,longitude,probability,
  candidate` (`rank` 1 = best; `candidate`: the model's id of the answer, a GeoCLIP gallery row or a GeoHier cell
  token, as text);
- for a calibrated model (`geoloc calibrate`), per image (repeated on each of its rows): `confidence_<r>km` for each
  radius r (the calibrated chance that the true place lies within r km of guess 1), `unfamiliar`, `unfamiliarity`;
- with places: `place,country,km` (`geoloc.geography.places`), per row;
- for a dataset read with its coordinates (`geoloc evaluate`): `true_latitude,true_longitude,error_km` (the
  geodesic distance from the row's guess to the true place), per row.

Unreadable images are not fatal: they go to `OUTPUT_STEM.errors.csv` (`id,error`). Chunk c of `chunk_size` rows
is done by process `c % num_processes` and written atomically to `OUTPUT.parts/chunk-NNNNNN.parquet`; at the end
the main process merges the parts into OUTPUT (.csv or .parquet) and removes the folder. A rerun resumes from the
parts, refusing options that differ from the first run's (`OUTPUT.parts/manifest.json`).
"""

import contextlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

OUTPUT_FORMATS = (".csv", ".parquet")
DECODE_WORKERS = 2
PREDICTION_COLUMNS = ["id", "rank", "latitude", "longitude", "probability", "candidate"]
FAMILIARITY_COLUMNS = ["unfamiliar", "unfamiliarity"]
PLACE_COLUMNS = ["place", "country", "km"]  # nearest town, country it lies in (None at sea), km to the town
REFERENCE_COLUMNS = ["true_latitude", "true_longitude", "error_km"]
ERROR_COLUMNS = ["id", "error"]
DTYPES = {"id": "string", "rank": "int64", "latitude": "float64", "longitude": "float64", "probability": "float64",
          "candidate": "string", "unfamiliar": "boolean", "unfamiliarity": "float64", "place": "string",
          "country": "string", "km": "float64", "true_latitude": "float64", "true_longitude": "float64",
          "error_km": "float64", "error": "string"}


def confidence_column(radius_km) -> str:
    return f"confidence_{radius_km:g}km"


def confidence_radii(columns) -> list[float]:
    """The radii of a table's `confidence_<r>km` columns, in column order (the schema's order)."""
    return [float(name[len("confidence_"):-len("km")]) for name in columns
            if name.startswith("confidence_") and name.endswith("km")]


@dataclass(frozen=True)
class Schema:
    """What a run's table holds beyond `PREDICTION_COLUMNS`, decided once per run (every chunk has the same
    columns): the calibrated radii (empty: uncalibrated), the familiarity flag, places, true coordinates."""

    radii_km: tuple = ()
    familiarity: bool = False
    places: bool = False
    references: bool = False

    @classmethod
    def of(cls, geolocator, places: bool = False, references: bool = False) -> "Schema":
        calibration = getattr(geolocator, "calibration", None)
        return cls(tuple(calibration["radii_km"]) if calibration else (),
                   getattr(geolocator, "familiarity", None) is not None, places, references)

    @property
    def columns(self) -> list[str]:
        return (PREDICTION_COLUMNS + [confidence_column(r) for r in self.radii_km]
                + (FAMILIARITY_COLUMNS if self.familiarity else []) + (PLACE_COLUMNS if self.places else [])
                + (REFERENCE_COLUMNS if self.references else []))


def row_ids(rows: dict, first: int, root: str | None = None) -> list[str]:
    """The ids of a batch of dataset rows (columns -> lists): the `id` column, else the image's path relative to
    the dataset folder `root` (so that `a/x.jpg` and `b/x.jpg` stay apart; the file name where the image lies
    outside `root` or there is none), else the row number (`first` is the row number of the first row)."""
    from ..data.dataset import is_inside  # here: `geoloc predict --help` does not import datasets

    ids = []
    root = os.path.abspath(root) if root else None
    for offset, image in enumerate(rows["image"]):
        given = rows["id"][offset] if "id" in rows else None
        path = image.get("path") if isinstance(image, dict) else image if isinstance(image, str) else None
        if given is not None:
            ids.append(str(given))
        elif path and root and is_inside(root, os.path.abspath(path)):
            ids.append(Path(os.path.relpath(os.path.abspath(path), root)).as_posix())
        else:
            ids.append(os.path.basename(path) if path else str(first + offset))
    return ids


def predictions_frame(results: list, schema: Schema, references: tuple | None = None):
    """The rows of `results` in the run's schema, `id` being each result's `input`: one row per (image, rank),
    plus an `error` column (one row with rank 0 and no coordinates for each unreadable image). `references`:
    `(latitudes, longitudes)`, the true place of each result (`schema.references`)."""
    import numpy as np
    import pandas as pd

    from ..geography.geodesy import geodesic_distance_km

    columns = {name: [] for name in schema.columns + ["error"]}
    for position, result in enumerate(results):
        count = max(len(result.latitudes), 1 if result.error else 0)
        columns["id"] += [result.input] * count
        columns["rank"] += list(range(1, len(result.latitudes) + 1)) or [0]
        for name, values in (("latitude", result.latitudes), ("longitude", result.longitudes),
                             ("probability", result.probabilities)):
            columns[name] += values.tolist() or [np.nan]
        # the model's id of each answer (GeoCLIP gallery row, GeoHier cell token), as text for one schema
        columns["candidate"] += [None if c is None else str(c) for c in result.candidate_ids or []] or [None]
        for radius in schema.radii_km:
            columns[confidence_column(radius)] += [(result.confidence or {}).get(radius, np.nan)] * count
        if schema.familiarity:
            columns["unfamiliar"] += [result.unfamiliar] * count
            columns["unfamiliarity"] += [np.nan if result.unfamiliarity is None else result.unfamiliarity] * count
        if schema.places:
            found = result.places or [{"place": None, "country": None, "km": np.nan}]
            for name in PLACE_COLUMNS:
                columns[name] += [place[name] for place in found]
        if schema.references:
            columns["true_latitude"] += [float(references[0][position])] * count
            columns["true_longitude"] += [float(references[1][position])] * count
        columns["error"] += [result.error] * count
    if schema.references:  # one geodesic call for the whole chunk; NaN on the rows of unreadable images
        answered = ~np.isnan(np.asarray(columns["latitude"], dtype=float))
        errors = np.full(len(answered), np.nan)
        errors[answered] = geodesic_distance_km(
            *(np.asarray(columns[name], dtype=float)[answered]
              for name in ("latitude", "longitude", "true_latitude", "true_longitude")))
        columns["error_km"] = errors.tolist()
    return pd.DataFrame(columns).astype({name: DTYPES.get(name, "float64") for name in columns})


@dataclass
class DatasetRun:
    """One run of the runner: where it writes, what it must resume with (`options`, the manifest), and how."""

    output: Path
    options: dict
    top_k: int
    batch_size: int
    chunk_size: int
    places: bool = False
    references: bool = False  # the dataset has `latitude`/`longitude` columns: add `REFERENCE_COLUMNS`
    ten_crop: bool = False
    decode_workers: int = DECODE_WORKERS  # threads that decode and process the next batches while the model runs
    root: str | None = None  # the dataset's local folder, for ids relative to it
    streaming: bool = False
    command: str = "geoloc predict"
    label: str = ""  # how errors name the output, e.g. "--output FILE" (default: its path)


def run_dataset(run: DatasetRun, state, load_dataset, load_geolocator) -> tuple[int, int] | None:
    """Geolocate every row of `load_dataset()` with `load_geolocator(device)` into `run.output` on this process
    (`state`: accelerate's `PartialState`); `(images, unreadable)` on the main process once merged, else None.
    A finished output (no parts folder) is left as it is and None is returned on every process."""
    from ..processes import exit_with_launcher, output_lock

    parts = ChunkParts(run.output)
    if run.output.exists() and not parts.folder.exists():
        return None
    exit_with_launcher()  # a worker whose launcher was killed must not keep writing parts
    lock = run.output.with_name(run.output.name + ".lock")
    with output_lock(lock, run.label or str(run.output)) if state.is_main_process else contextlib.nullcontext():
        return _geolocate_chunks(run, state, parts, load_dataset, load_geolocator)


def _geolocate_chunks(run: DatasetRun, state, parts: "ChunkParts", load_dataset, load_geolocator):
    """The work of `run_dataset` on this process: its chunks not yet done, then (main process) the merge."""
    from tqdm.auto import tqdm

    with state.main_process_first():  # one process builds the datasets cache, the others read it
        dataset = load_dataset()
    rows = None if run.streaming else len(dataset)
    parts.check_manifest({**run.options, "rows": rows}, create=state.is_main_process)
    geolocator = load_geolocator(state.device)
    schema = Schema.of(geolocator, run.places, run.references)
    state.wait_for_everyone()

    def mine(chunk: int) -> bool:
        return chunk % state.num_processes == state.process_index and not parts.done(chunk)

    total = None if rows is None else sum(min(run.chunk_size, rows - first)
                                          for first in range(0, rows, run.chunk_size) if mine(first // run.chunk_size))
    _report_resumed(parts, run, rows, state.is_main_process)
    progress = tqdm(total=total, unit="image", desc=f"Geolocating (process {state.process_index + 1} of "
                    f"{state.num_processes})", disable=not state.is_local_main_process)
    num_chunks = 0
    for chunk, first, batch in iterate_chunks(dataset, run.chunk_size, mine):
        num_chunks = chunk + 1
        if batch is None:
            continue
        results = geolocator.locate_images(batch["image"], run.top_k, places=run.places, ten_crop=run.ten_crop,
                                           names=row_ids(batch, first, run.root), batch_size=run.batch_size,
                                           decode_workers=run.decode_workers)
        references = (batch["latitude"], batch["longitude"]) if run.references else None
        parts.write(chunk, predictions_frame(results, schema, references))
        progress.update(len(results))
    progress.close()
    state.wait_for_everyone()
    return parts.merge(num_chunks, run.output.suffix.lower()) if state.is_main_process else None


def read_predictions(path: Path):
    """A runner's output table (.csv or .parquet) with the schema's dtypes."""
    import pandas as pd

    frame = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(
        path, dtype={"id": "string", "candidate": "string", "place": "string", "country": "string"})
    return frame.astype({name: DTYPES.get(name, "float64") for name in frame.columns})


class ChunkParts:
    """The resumable parts of one `--dataset` run: `OUTPUT.parts/chunk-NNNNNN.parquet` and `manifest.json`."""

    def __init__(self, output: Path):
        self.output = output
        self.folder = output.with_name(output.name + ".parts")
        self.manifest = self.folder / "manifest.json"

    def path(self, chunk: int) -> Path:
        return self.folder / f"chunk-{chunk:06d}.parquet"

    def done(self, chunk: int) -> bool:
        return self.path(chunk).is_file()

    def check_manifest(self, options: dict, create: bool) -> None:
        """Refuse to resume parts written with other options; with `create`, start the folder if new."""
        if self.manifest.is_file():
            previous = json.loads(self.manifest.read_text())
            changed = {key: (previous.get(key), value) for key, value in options.items() if previous.get(key) != value}
            if changed:
                listed = "; ".join(f"{key}: {old!r} then, {new!r} now" for key, (old, new) in changed.items())
                raise ValueError(f"{self.folder} holds a run with other options ({listed}): rerun with the same "
                                 f"options to resume, or delete {self.folder} to start over.")
        elif create:
            errors = errors_path(self.output)
            if errors.exists():  # not this run's: never deleted, never mixed with this run's errors
                raise ValueError(f"{errors} already exists, where this run lists its unreadable images: delete or "
                                 "move it, or give another --output.")
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomically(self.manifest, lambda path: path.write_text(json.dumps(options, indent=2)))

    def write(self, chunk: int, frame) -> None:
        _write_atomically(self.path(chunk), lambda path: frame.to_parquet(path, index=False))

    def merge(self, num_chunks: int, output_format: str) -> tuple[int, int]:
        """Concatenate the parts in order into the output (and the errors file); returns (images, unreadable)."""
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        missing = [chunk for chunk in range(num_chunks) if not self.done(chunk)]
        if missing:
            raise ValueError(f"{len(missing)} chunk(s) of {self.output} were not written (first: {missing[0]}): "
                             "a process failed; rerun the same command to finish them.")
        errors, images = [], 0

        def write(path: Path) -> None:
            nonlocal images
            writer = None
            for chunk in range(num_chunks):
                frame = pd.read_parquet(self.path(chunk))
                failed = frame["error"].notna()
                errors.append(frame.loc[failed, ERROR_COLUMNS])
                frame = frame.loc[~failed].drop(columns="error")
                images += int((frame["rank"] == 1).sum())
                if output_format == ".csv":
                    frame.to_csv(path, mode="a" if chunk else "w", header=chunk == 0, index=False)
                else:
                    table = pa.Table.from_pandas(frame, preserve_index=False)
                    writer = writer or pq.ParquetWriter(path, table.schema)
                    writer.write_table(table)
            if writer is not None:
                writer.close()

        _write_atomically(self.output, write)
        errors = pd.concat(errors, ignore_index=True) if errors else pd.DataFrame(columns=ERROR_COLUMNS)
        errors_file = errors_path(self.output)
        if len(errors):
            _write_atomically(errors_file, lambda path: errors.to_csv(path, index=False))
        shutil.rmtree(self.folder)
        return images, len(errors)


def errors_path(output: Path) -> Path:
    """Where the unreadable images of a `--dataset` run are listed: `OUTPUT_STEM.errors.csv`."""
    return output.with_name(output.stem + ".errors.csv")


def _write_atomically(path: Path, write) -> None:
    """`write(temporary_path)`, then rename over `path`: a reader never sees a half-written file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _report_resumed(parts: "ChunkParts", run: DatasetRun, rows: int | None, main_process: bool) -> None:
    """Say how much of the work a rerun keeps: "Resumed: 1,200 of 3,000 rows already predicted (...)"."""
    done = sorted(int(path.stem.split("-")[1]) for path in parts.folder.glob("chunk-*.parquet"))
    if not done or not main_process:
        return
    if rows is None:  # a stream: its length is known once read
        kept = f"{len(done):,} chunks of {run.chunk_size:,} rows"
    else:
        kept = f"{sum(min(run.chunk_size, rows - chunk * run.chunk_size) for chunk in done):,} of {rows:,} rows"
    print(f"{run.command}: Resumed: {kept} already predicted (in {parts.folder}).", file=sys.stderr)


def iterate_chunks(dataset, chunk_size: int, wanted):
    """`(chunk, first_row, rows)` for every chunk of `chunk_size` consecutive rows, in order, with `rows` as
    columns -> lists, or None where `wanted(chunk)` is false (then a `Dataset` is not read; a stream is read past).
    """
    import datasets

    if isinstance(dataset, datasets.Dataset):
        for chunk, first in enumerate(range(0, len(dataset), chunk_size)):
            yield chunk, first, dataset[first : first + chunk_size] if wanted(chunk) else None
        return
    chunk, rows = 0, []
    for row in dataset:
        rows.append(row)
        if len(rows) == chunk_size:
            yield chunk, chunk * chunk_size, _columns(rows) if wanted(chunk) else None
            chunk, rows = chunk + 1, []
    if rows:
        yield chunk, chunk * chunk_size, _columns(rows) if wanted(chunk) else None


def _columns(rows: list[dict]) -> dict:
    return {name: [row[name] for row in rows] for name in rows[0]}
