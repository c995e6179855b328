"""`geoloc evaluate` end to end on tiny local datasets (benchmark layouts and an image folder), a tiny
random GeoCLIP saved to disk, unreadable images, top-k, and sharding under `accelerate launch`."""

import json
import os
import shutil
import subprocess
import time
import zipfile

import numpy as np
import pandas as pd
import pytest
from transformers import AutoImageProcessor, AutoModel

from conftest import accelerate_launch, save_tiny_geoclip
from geoloc.data import benchmarks as benchmark_datasets
from geoloc.data.benchmarks import load_benchmark
from geoloc.cli import main as cli_main
from geoloc import cli
from geoloc.inference.evaluate import main
from geoloc.inference.runner import Schema
from geoloc.geography.geodesy import geodesic_distance_km
from geoloc.inference.metrics import distance_metrics, geolocation_metrics
from geoloc.data.worldmap import render_crop
from geoloc.models import register_models

register_models()  # the Auto classes below read GeoCLIP and GeoHier checkpoints

METRIC_KEYS = ["acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km", "mean_km", "median_km", "geoscore"]
# (latitude, longitude) of the test images: cities on every continent, the antimeridian and a pole.
POINTS = [(48.86, 2.35), (-33.87, 151.21), (40.71, -74.01), (-1.29, 36.82), (35.68, 139.69),
          (-22.91, -43.17), (64.15, -21.94), (-77.85, 166.67), (0.5, 179.9), (1.3, 103.8)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random GeoCLIP with a 64-point gallery and a 32-pixel image processor, saved to disk."""
    directory = tmp_path_factory.mktemp("tiny-geoclip")
    save_tiny_geoclip(directory, np.random.default_rng(0).uniform([-90, -180], [90, 180], size=(64, 2)))
    return directory


def _crops(folder, names):
    """World-map crops at POINTS saved under the given file names."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (lat, lon) in zip(names, POINTS):
        render_crop(lat, lon, rng).save(folder / name)


def _im2gps3k(root):
    """Im2GPS3k's layout: im2gps3k_places365.csv + images/, with one corrupt and one missing image."""
    names = [f"{1000 + i}_abc_{i}_12345@N00.jpg" for i in range(len(POINTS))]
    _crops(root / "images", names)
    (root / "images" / names[3]).write_bytes(b"not a jpeg")
    (root / "images" / names[5]).unlink()
    pd.DataFrame({
        "IMG_ID": names, "AUTHOR": "12345@N00", "LAT": [p[0] for p in POINTS], "LON": [p[1] for p in POINTS],
        "S3_Label": 1,
    }).to_csv(root / "im2gps3k_places365.csv", index=False)
    return names


def _expected(model_dir, image_paths, top_k=1):
    model = AutoModel.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    output = model.geolocate(pixel_values=processor(image_paths, return_tensors="pt").pixel_values, top_k=top_k)
    return output.latitudes.double().numpy(), output.longitudes.double().numpy()


def _read(output_dir):
    with open(output_dir / "metrics.json") as handle:
        metrics = json.load(handle)
    return metrics, pd.read_csv(output_dir / "predictions.csv", dtype={"id": str})


def test_benchmark_layout_end_to_end(model_dir, tmp_path):
    names = _im2gps3k(tmp_path / "im2gps3k")
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--dataset", "im2gps3k", "--data-dir", str(tmp_path / "im2gps3k"),
                 "--output-dir", str(out), "--batch-size", "3"]) == 0
    metrics, predictions = _read(out)

    readable = [i for i in range(len(POINTS)) if i not in (3, 5)]
    # the dataset runner's schema (the one of `predict --dataset`), with the true places and the errors
    assert list(predictions.columns) == Schema(references=True).columns
    assert predictions["id"].tolist() == [names[i] for i in readable] and set(predictions["rank"]) == {1}
    np.testing.assert_allclose(predictions[["true_latitude", "true_longitude"]], np.array(POINTS)[readable])
    lat, lon = _expected(model_dir, [tmp_path / "im2gps3k" / "images" / names[i] for i in readable])
    np.testing.assert_allclose(predictions["latitude"], lat[:, 0], atol=1e-6)
    np.testing.assert_allclose(predictions["longitude"], lon[:, 0], atol=1e-6)
    np.testing.assert_allclose(predictions["error_km"], geodesic_distance_km(
        lat[:, 0], lon[:, 0], *np.array(POINTS)[readable].T), rtol=1e-9)

    assert list(metrics)[:8] == METRIC_KEYS
    assert {key: metrics[key] for key in METRIC_KEYS} == pytest.approx(geolocation_metrics(
        predictions["latitude"], predictions["longitude"], predictions["true_latitude"], predictions["true_longitude"]
    ))
    assert metrics["n"] == 8 and metrics["n_unreadable"] == 2
    assert metrics["dataset"] == "im2gps3k" and metrics["model"] == str(model_dir) and metrics["top_k"] == 1
    unreadable = pd.read_csv(out / "predictions.errors.csv")
    assert unreadable["id"].tolist() == [names[3], names[5]]
    assert "not an image" in unreadable["error"][0] and "does not exist" in unreadable["error"][1]


def test_image_folder_top_k_and_max_samples_through_the_cli(model_dir, tmp_path):
    data = tmp_path / "worldmap" / "test"
    names = [f"crop_{i}.png" for i in range(len(POINTS))]
    _crops(data, names)
    pd.DataFrame({"file_name": names, "lat": [p[0] for p in POINTS], "lon": [p[1] for p in POINTS]}).to_csv(
        data / "metadata.csv", index=False
    )
    out = tmp_path / "out"
    assert cli_main(["evaluate", "--model", str(model_dir), "--dataset", str(tmp_path / "worldmap"),
                     "--lat-column", "lat", "--lon-column", "lon", "--output-dir", str(out),
                     "--top-k", "5", "--max-samples", "6"]) == 0
    metrics, predictions = _read(out)
    best = predictions[predictions["rank"] == 1]
    assert predictions["rank"].tolist() == [1, 2, 3, 4, 5] * 6
    # ids as `predict --dataset` makes them: relative to the dataset folder
    assert best["id"].tolist() == [f"test/{name}" for name in names[:6]]
    assert metrics["n"] == 6 and metrics["n_unreadable"] == 0
    assert not (out / "predictions.errors.csv").exists()
    # A folder of images + metadata.csv without split subfolders is read as its one split.
    assert cli_main(["evaluate", "--model", str(model_dir), "--dataset", str(data), "--lat-column", "lat",
                     "--lon-column", "lon", "--output-dir", str(tmp_path / "single"), "--max-samples", "6"]) == 0
    single, _ = _read(tmp_path / "single")
    assert {key: single[key] for key in ("n", "median_km")} == {"n": 6, "median_km": metrics["median_km"]}
    lat, lon = _expected(model_dir, [data / name for name in names[:6]], top_k=5)
    np.testing.assert_allclose(predictions["latitude"].to_numpy().reshape(6, 5), lat, atol=1e-6)
    truth = np.array(POINTS[:6])
    errors = geodesic_distance_km(lat.ravel(), lon.ravel(), np.repeat(truth[:, 0], 5), np.repeat(truth[:, 1], 5))
    assert metrics["top_k"] == 5
    assert metrics["best_of_top_k"] == pytest.approx(distance_metrics(errors.reshape(6, 5).min(axis=1)))
    assert metrics["best_of_top_k"]["mean_km"] <= metrics["mean_km"]


def test_all_unreadable_and_bad_arguments(model_dir, tmp_path, capsys):
    _im2gps3k(tmp_path / "bench")
    for path in (tmp_path / "bench" / "images").iterdir():
        path.write_bytes(b"")
    assert cli.main(["evaluate", "--model", str(model_dir), "--dataset", "im2gps3k", "--data-dir",
                     str(tmp_path / "bench"), "--output-dir", str(tmp_path / "out")]) == 1
    assert "geoloc evaluate: error: No image of 'im2gps3k' could be read" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model", str(model_dir), "--dataset", str(tmp_path), "--data-dir", str(tmp_path),
                     "--output-dir", str(tmp_path / "out")]) == 1
    assert "--data-dir is for the benchmarks" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(model_dir), "--dataset", "im2gps3k", "--output-dir", "x", "--batch-size", "0"])
    assert exit_info.value.code == 2 and "--batch-size must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "csv", "columns", "image_dir"), [
    ("im2gps", "im2gps_places365.csv", ("IMG_ID", "LAT", "LON"), "gps_query_imgs"),
    ("yfcc4k", "yfcc4k_places365.csv", ("IMG_ID", "LAT", "LON"), "yfcc4k"),
    ("yfcc26k", "yfcc25600_places365.csv", ("IMG_ID", "LAT", "LON"), "yfcc25600"),
    ("gws15k", "gws15k.csv", ("id", "latitude", "longitude"), "images"),
])
def test_benchmark_loaders(tmp_path, name, csv, columns, image_dir):
    names = [f"{i}.jpg" for i in range(3)]
    _crops(tmp_path / image_dir, names)
    pd.DataFrame(dict(zip(columns, (names, [1.0, 2.0, -3.0], [4.0, -179.5, 180.0])))).to_csv(
        tmp_path / csv, index=False
    )
    dataset = load_benchmark(name, tmp_path)
    assert dataset.column_names == ["id", "image", "latitude", "longitude"]
    assert dataset["id"] == names and dataset["longitude"] == [4.0, -179.5, 180.0]
    assert [row["path"] for row in dataset["image"]] == [str(tmp_path / image_dir / n) for n in names]


def test_yfcc4k_from_the_yfcc26k_csv_keeps_only_present_images(tmp_path):
    _crops(tmp_path / "images", ["b.jpg"])
    pd.DataFrame({"IMG_ID": ["a.jpg", "b.jpg", "c.jpg"], "LAT": [1, 2, 3], "LON": [4, 5, 6]}).to_csv(
        tmp_path / "yfcc25600_places365.csv", index=False
    )
    assert load_benchmark("yfcc4k", tmp_path)["id"] == ["b.jpg"]
    assert load_benchmark("yfcc26k", tmp_path)["id"] == ["a.jpg", "b.jpg", "c.jpg"]  # all kept, missing reported


def _osv5m_snapshot(target):
    """OSV-5M's Hub layout: test.csv (numeric ids) and images/test/00.zip holding 00/<id>.jpg."""
    ids = ["3859149887465501", "100000000000000007"]
    (target / "images" / "test").mkdir(parents=True)
    staging = target / "staging"
    _crops(staging, [f"{i}.jpg" for i in ids])
    with zipfile.ZipFile(target / "images" / "test" / "00.zip", "w") as archive:
        for image_id in ids:
            archive.write(staging / f"{image_id}.jpg", f"00/{image_id}.jpg")
    shutil.rmtree(staging)
    pd.DataFrame({"id": ids, "latitude": [-43.8, 10.0], "longitude": [-176.6, 20.0], "country": ["NZ", "X"]}).to_csv(
        target / "test.csv", index=False
    )
    return ids


def test_osv5m_download_path(tmp_path, monkeypatch):
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        _osv5m_snapshot(kwargs["local_dir"])

    monkeypatch.setattr(benchmark_datasets, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(benchmark_datasets, "benchmark_dir", lambda name: tmp_path / name)
    dataset = load_benchmark("osv5m")
    assert calls == [{"repo_id": "osv5m/osv5m", "repo_type": "dataset",
                      "allow_patterns": ["test.csv", "images/test/*.zip"], "local_dir": tmp_path / "osv5m"}]
    assert dataset["id"] == ["3859149887465501", "100000000000000007"]  # ids stay exact strings
    assert all(os.path.isfile(row["path"]) for row in dataset["image"])
    assert dataset[0]["image"]["path"].endswith(os.path.join("images", "test", "00", "3859149887465501.jpg"))
    with pytest.raises(ValueError, match="no public Hugging Face Hub copy"):
        load_benchmark("im2gps3k")
    with pytest.raises(ValueError, match="Unknown benchmark 'im2gps5k'"):
        load_benchmark("im2gps5k", tmp_path)
    with pytest.raises(ValueError, match="no metadata CSV"):
        load_benchmark("gws15k", tmp_path)


def test_accelerate_launch_two_processes(model_dir, tmp_path):
    """The same evaluation sharded over 2 CPU processes gathers to the single-process result, in order."""
    _im2gps3k(tmp_path / "bench")
    args = ["--model", str(model_dir), "--dataset", "im2gps3k", "--data-dir", str(tmp_path / "bench"),
            "--batch-size", "2"]
    main([*args, "--output-dir", str(tmp_path / "single")])
    # CPU-only: `--cpu --num_processes 2` would start one process (accelerate wants MPI for multi-CPU);
    # torchrun-style ranks on CPU with gloo are `--multi_gpu` plus ACCELERATE_USE_CPU.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    started = time.perf_counter()
    completed = subprocess.run(
        [*accelerate_launch(), "-m", "geoloc.inference.evaluate", *args,
         "--output-dir", str(tmp_path / "sharded")],
        check=True, env=env, timeout=240, capture_output=True, text=True,
    )
    print(f"accelerate launch took {time.perf_counter() - started:.1f} s")
    assert "8 images scored, 2 unreadable, 2 process(es)" in completed.stdout
    single, single_predictions = _read(tmp_path / "single")
    sharded, sharded_predictions = _read(tmp_path / "sharded")
    pd.testing.assert_frame_equal(single_predictions, sharded_predictions, atol=1e-9)
    assert sharded == pytest.approx(single)
    assert sharded["n"] == 8 and sharded["n_unreadable"] == 2


def test_ten_crop_evaluation_averages_the_crops_logits(tmp_path):
    """`--ten-crop` (GeoHier): each image's ten crops go through the model and their logits are averaged before the
    softmax and the hierarchical product, as GeoGuessNet's eval_images_weighted does."""
    import torch

    from geoloc.configs import tiny_geohier_config
    from geoloc.geography.geocells import build_geocells
    from geoloc.training.tasks import geodecoder_image_processor
    from modeling_geohier import GeoHierModel

    cells, _ = build_geocells(*np.array(POINTS * 3).T, levels=[(1, 12), (1, 6), (1, 2)], min_level=0)
    torch.manual_seed(0)
    model = GeoHierModel(tiny_geohier_config(cells_per_level=[len(level["tokens"]) for level in cells])).eval()
    model.set_cell_table(cells)
    model.save_pretrained(tmp_path / "geohier")
    processor = geodecoder_image_processor((32, 32))  # resize 37 + centre crop 32, as GeoGuessNet's 256 / 224
    processor.save_pretrained(tmp_path / "geohier")
    data = tmp_path / "maps"
    names = [f"crop_{i}.png" for i in range(len(POINTS))]
    _crops(data, names)
    pd.DataFrame({"file_name": names, "latitude": [p[0] for p in POINTS],
                  "longitude": [p[1] for p in POINTS]}).to_csv(data / "metadata.csv", index=False)
    out = tmp_path / "out"
    assert main(["--model", str(tmp_path / "geohier"), "--dataset", str(data), "--output-dir", str(out),
                 "--ten-crop", "--batch-size", "4"]) == 0
    metrics, predictions = _read(out)
    assert metrics["ten_crop"] is True and metrics["n"] == len(POINTS)

    crops = processor.ten_crop([data / name for name in names], return_tensors="pt").pixel_values
    with torch.no_grad():
        output = model(pixel_values=crops)
    averaged = tuple(logits.view(len(names), 10, -1).mean(dim=1) for logits in output.logits)
    best = model.hierarchical_probabilities(averaged)[-1].argmax(dim=1)
    centroids = model.get_cell_table()[-1]
    np.testing.assert_allclose(predictions["latitude"], centroids["latitudes"][best.numpy()], atol=1e-6)
    np.testing.assert_allclose(predictions["longitude"], centroids["longitudes"][best.numpy()], atol=1e-6)


def test_ten_crop_is_refused_for_geoclip(model_dir, tmp_path):
    _crops(tmp_path / "maps", ["a.png"])
    pd.DataFrame({"file_name": ["a.png"], "latitude": [1.0], "longitude": [2.0]}).to_csv(
        tmp_path / "maps" / "metadata.csv", index=False)
    with pytest.raises(ValueError, match="Ten-crop evaluation is GeoHier's"):
        main(["--model", str(model_dir), "--dataset", str(tmp_path / "maps"), "--output-dir", str(tmp_path / "o"),
              "--ten-crop"])


def test_a_killed_evaluation_resumes_to_the_same_results(model_dir, tmp_path, monkeypatch, capsys):
    """Evaluation is the dataset runner plus the metric: a run killed after its first chunk resumes from the
    written chunks (and says so) to the results of an uninterrupted run; a finished folder is replaced."""
    from geoloc.inference import runner

    _im2gps3k(tmp_path / "bench")
    args = ["--model", str(model_dir), "--dataset", "im2gps3k", "--data-dir", str(tmp_path / "bench"),
            "--chunk-size", "3", "--batch-size", "2", "--top-k", "2"]
    assert main([*args, "--output-dir", str(tmp_path / "whole")]) == 0
    write, written = runner.ChunkParts.write, []

    def die_after_the_first(self, chunk, frame):
        if written:
            raise RuntimeError("killed")
        written.append(chunk)
        write(self, chunk, frame)

    monkeypatch.setattr(runner.ChunkParts, "write", die_after_the_first)
    with pytest.raises(RuntimeError, match="killed"):
        main([*args, "--output-dir", str(tmp_path / "resumed")])
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*args, "--output-dir", str(tmp_path / "resumed")]) == 0
    assert "geoloc evaluate: Resumed: 3 of 10 rows already predicted" in capsys.readouterr().err
    whole, whole_predictions = _read(tmp_path / "whole")
    resumed, resumed_predictions = _read(tmp_path / "resumed")
    pd.testing.assert_frame_equal(resumed_predictions, whole_predictions)
    assert resumed == whole and resumed["n"] == 8 and "best_of_top_k" in resumed
    written.clear()
    monkeypatch.setattr(runner.ChunkParts, "write", die_after_the_first)
    with pytest.raises(RuntimeError, match="killed"):
        main([*args, "--output-dir", str(tmp_path / "other")])
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"holds a run with other options \(top_k: 2 then, 1 now"):
        main([*args[:-2], "--top-k", "1", "--output-dir", str(tmp_path / "other")])  # resumes as it began
    assert main([*args[:-2], "--top-k", "1", "--output-dir", str(tmp_path / "whole")]) == 0  # finished: replaced
    assert _read(tmp_path / "whole")[0]["top_k"] == 1
