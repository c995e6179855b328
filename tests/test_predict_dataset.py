"""`geoloc predict --dataset`: batch geolocation of a small world-map dataset with the bundled model, on one
process and on two (`accelerate launch`), resuming an interrupted run, reporting unreadable images, CSV,
parquet and streaming outputs."""

import os
import shutil
import subprocess

import pandas as pd
import pytest

from conftest import accelerate_launch
from geoloc import DEFAULT_MODEL, cli

from geoloc.inference import runner
from geoloc.inference.adapter import Geolocator
from geoloc.data.worldmap import build_worldmap_splits, write_imagefolder

TOP_K = 3
BAD_IMAGE = "broken.png"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """19 world-map crops (an image folder with metadata.csv) plus one unreadable file, in row 7."""
    folder = tmp_path_factory.mktemp("worldmap")
    write_imagefolder(build_worldmap_splits(train=19, test=0, seed=3), str(folder))
    folder = folder / "train"
    (folder / BAD_IMAGE).write_text("not a png")
    metadata = pd.read_csv(folder / "metadata.csv")
    bad_row = pd.DataFrame({"file_name": [BAD_IMAGE], "latitude": [10.0], "longitude": [20.0]})
    pd.concat([metadata[:7], bad_row, metadata[7:]]).to_csv(folder / "metadata.csv", index=False)
    return folder


def run(dataset, output, *extra) -> int:
    """`geoloc predict --dataset ...` through the dispatcher (failures: one line on stderr, exit status 1)."""
    return cli.main(["predict", "--dataset", str(dataset), "--output", str(output), "--model", "default",
                     "--top-k", str(TOP_K), "--chunk-size", "4", "--batch-size", "3", *extra])


@pytest.fixture(scope="module")
def single(dataset, tmp_path_factory):
    """The one-process answer, written as CSV."""
    output = tmp_path_factory.mktemp("single") / "predictions.csv"
    assert run(dataset, output) == 0
    return output


def read(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"id": str, "candidate": str}) if str(path).endswith(".csv") else pd.read_parquet(path)


def test_one_row_per_image_and_rank_as_the_adapter_answers(dataset, single):
    frame = read(single)
    geolocator = Geolocator.from_pretrained(DEFAULT_MODEL)  # calibrated: confidence and familiarity columns
    assert list(frame.columns) == ["id", "rank", "latitude", "longitude", "probability", "candidate",
                                   "confidence_25km", "confidence_200km", "confidence_750km", "confidence_2500km",
                                   "unfamiliar", "unfamiliarity"] == runner.Schema.of(geolocator).columns
    names = [name for name in pd.read_csv(dataset / "metadata.csv")["file_name"] if name != BAD_IMAGE]
    assert frame["id"].tolist() == [name for name in names for _ in range(TOP_K)]  # dataset order
    assert frame["rank"].tolist() == list(range(1, TOP_K + 1)) * len(names)
    expected = geolocator.locate_images([str(dataset / n) for n in names], TOP_K)
    for name, result in zip(names, expected):
        rows = frame[frame["id"] == name]
        assert rows["latitude"].tolist() == result.latitudes.tolist()
        assert rows["longitude"].tolist() == result.longitudes.tolist()
        assert rows["candidate"].astype(str).tolist() == [str(row) for row in result.candidate_ids]  # gallery rows
        # other batches than the reference call: float32 sums in another order
        assert rows["probability"].tolist() == pytest.approx(result.probabilities.tolist(), rel=1e-4)
        for radius, confidence in result.confidence.items():  # per image, on each of its rows
            assert rows[f"confidence_{radius}km"].tolist() == pytest.approx([confidence] * TOP_K, rel=1e-4)
        assert rows["unfamiliar"].tolist() == [result.unfamiliar] * TOP_K
    errors = pd.read_csv(runner.errors_path(single))
    assert errors["id"].tolist() == [BAD_IMAGE] and "is not an image file" in errors["error"][0]
    assert not (single.parent / "predictions.csv.parts").exists()


def test_two_processes_match_one_process_row_for_row(dataset, single, tmp_path):
    output = tmp_path / "sharded.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    completed = subprocess.run(
        [*accelerate_launch(), "-m", "geoloc.inference.predict",
         "--dataset", str(dataset), "--output", str(output), "--model", "default", "--top-k", str(TOP_K),
         "--chunk-size", "4", "--batch-size", "3"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "19 images geolocated, 1 unreadable" in completed.stdout and "2 process(es)" in completed.stdout
    sharded, expected = read(output), read(single)
    # The same rows in the same order; the probabilities to float32 rounding (MKL's results depend on memory
    # alignment unless MKL_CBWR=AUTO,STRICT is set: then the two files are byte-identical).
    pd.testing.assert_frame_equal(sharded.drop(columns="probability"), expected.drop(columns="probability"))
    assert sharded["probability"].tolist() == pytest.approx(expected["probability"].tolist(), rel=1e-5)
    assert runner.errors_path(output).read_text() == runner.errors_path(single).read_text()


def test_an_interrupted_run_resumes_where_it_stopped(dataset, single, tmp_path, monkeypatch):
    output = tmp_path / "resumed.csv"
    write = runner.ChunkParts.write
    written = []

    def write_then_die_at_the_third(parts, chunk, frame):
        if len(written) == 2:
            raise KeyboardInterrupt  # as a kill would stop it: two chunks saved, no output yet
        write(parts, chunk, frame)
        written.append(chunk)

    monkeypatch.setattr(runner.ChunkParts, "write", write_then_die_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        run(dataset, output)
    monkeypatch.setattr(runner.ChunkParts, "write", write)
    parts = output.with_name("resumed.csv.parts")
    assert sorted(p.name for p in parts.glob("chunk-*")) == ["chunk-000000.parquet", "chunk-000001.parquet"]
    assert not output.exists()
    (parts / ".chunk-000002.parquet.999.tmp").write_bytes(b"half a part")  # a kill in the middle of a write
    assert run(dataset, output, "--top-k", "2") == 1  # other options than the parts were written with: refused

    located = []
    locate = Geolocator.locate_images
    monkeypatch.setattr(Geolocator, "locate_images", lambda self, images, *a, **k: located.extend(images)
                        or locate(self, images, *a, **k))
    assert run(dataset, output) == 0
    assert len(located) == 20 - 8  # only the rows of the chunks not yet written
    assert output.read_text() == single.read_text() and not parts.exists()  # same process: same bytes
    before = output.stat().st_mtime_ns
    assert run(dataset, output) == 0  # done: nothing to do, the output is left alone
    assert output.stat().st_mtime_ns == before and len(located) == 12


def test_mismatched_resume_is_a_readable_error(dataset, tmp_path, capsys):
    output = tmp_path / "p.csv"
    parts = output.with_name("p.csv.parts")
    parts.mkdir()
    (parts / "manifest.json").write_text('{"top_k": 9}')
    assert run(dataset, output) == 1
    error = capsys.readouterr().err
    assert "holds a run with other options (" in error and "top_k: 9 then, 3 now" in error
    assert error.count("\n") == 1 and "Traceback" not in error


def test_parquet_streaming_and_places(dataset, single, tmp_path):
    output = tmp_path / "predictions.parquet"
    assert run(dataset, output, "--streaming", "--places") == 0
    frame, expected = read(output), read(single)
    assert list(frame.columns) == list(expected.columns) + ["place", "country", "km"]
    pd.testing.assert_frame_equal(frame[expected.columns].astype({"id": object}), expected, check_dtype=False)
    assert frame["place"].notna().all() and (frame["km"] >= 0).all()
    assert pd.read_csv(runner.errors_path(output))["id"].tolist() == [BAD_IMAGE]


def same_answers(frame: pd.DataFrame, expected: pd.DataFrame) -> None:
    """The same coordinates per id and rank (rows may come in another order, in other batches: the
    probabilities and the calibrated numbers derived from them up to float32 summation order)."""
    frame, expected = (f.sort_values(["id", "rank"]).reset_index(drop=True) for f in (frame, expected))
    summed = [name for name in frame.columns if name in ("probability", "unfamiliarity") or name.startswith("confidence_")]
    pd.testing.assert_frame_equal(frame.drop(columns=summed), expected.drop(columns=summed), check_dtype=False)
    for name in summed:
        assert frame[name].tolist() == pytest.approx(expected[name].tolist(), rel=1e-4), name


def test_a_plain_photo_folder_is_geolocated_without_metadata(dataset, single, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(dataset, photos, ignore=shutil.ignore_patterns("metadata.csv"))
    output = tmp_path / "plain.csv"
    assert run(photos, output) == 0
    same_answers(read(output), read(single))
    assert pd.read_csv(runner.errors_path(output))["id"].tolist() == [BAD_IMAGE]


def test_rows_with_missing_or_invalid_coordinates_are_still_geolocated(dataset, single, tmp_path):
    """Coordinates are not needed to predict: a NaN or out-of-range one must not drop the photo."""
    labelled = tmp_path / "labelled"
    shutil.copytree(dataset, labelled)
    metadata = pd.read_csv(labelled / "metadata.csv")
    metadata.loc[0, "latitude"], metadata.loc[1, "longitude"] = float("nan"), 500.0
    metadata.to_csv(labelled / "metadata.csv", index=False)
    output = tmp_path / "labelled.csv"
    assert run(labelled, output) == 0
    same_answers(read(output), read(single))


def test_row_ids_prefer_the_id_column_then_the_file_name_then_the_row_number():
    rows = {"image": [{"path": "/a/b/x.jpg", "bytes": None}, {"path": None, "bytes": b"..."}], "id": [None, 42]}
    assert runner.row_ids(rows, first=10) == ["x.jpg", "42"]
    assert runner.row_ids({"image": [{"path": None, "bytes": b"..."}]}, first=10) == ["10"]
    # under the dataset folder: the relative path, so that files of the same name in two folders stay apart
    rows = {"image": [{"path": "/data/a/x.jpg"}, {"path": "/data/b/x.jpg"}, {"path": "/elsewhere/y.jpg"}]}
    assert runner.row_ids(rows, first=0, root="/data") == ["a/x.jpg", "b/x.jpg", "y.jpg"]
