"""The image-geolocation pipeline, `geoloc predict` (files and texts) and `geoloc.data.gallery` on a tiny saved
GeoCLIP."""

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

import geoloc.inference.adapter
import geoloc.pipeline  # noqa: F401  (registers the image-geolocation task)
from conftest import save_tiny_geoclip
from geoloc import cli
from geoloc.inference import predict
from geoloc.data.gallery import load_gallery
from modeling_geoclip import GeoCLIPImageProcessor, GeoCLIPModel

GALLERY = np.array([[48.8566, 2.3522], [40.7128, -74.006], [-33.8688, 151.2093], [35.6762, 139.6503],
                    [-1.2921, 36.8219], [64.1466, -21.9426], [-90.0, 180.0], [90.0, -180.0]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny GeoCLIP saved as `geoloc predict` expects (model, image processor, tokenizer), plus 5 photos."""
    folder = tmp_path_factory.mktemp("tiny-geoclip")
    save_tiny_geoclip(folder, GALLERY)
    generator = np.random.default_rng(0)
    for index in range(5):
        pixels = generator.integers(0, 256, size=(40 + index, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{index}.png")
    return folder


@pytest.fixture(scope="module")
def photos(checkpoint):
    return [str(checkpoint / f"photo{index}.png") for index in range(5)]


@pytest.fixture(scope="module")
def geolocator(checkpoint):
    return pipeline("image-geolocation", model=str(checkpoint))


def _reference(checkpoint, images, top_k):
    model = GeoCLIPModel.from_pretrained(checkpoint).eval()
    pixels = GeoCLIPImageProcessor.from_pretrained(checkpoint)(images, return_tensors="pt").pixel_values
    return model.geolocate(pixel_values=pixels, top_k=top_k)


def _assert_same_predictions(actual: list[dict], expected: list[dict]) -> None:
    assert [(p["latitude"], p["longitude"]) for p in actual] == [(p["latitude"], p["longitude"]) for p in expected]
    assert [p["probability"] for p in actual] == pytest.approx([p["probability"] for p in expected], abs=1e-6)


# ---------------------------------------------------------------------------------------------- pipeline
def test_pipeline_matches_geolocate(checkpoint, photos, geolocator):
    assert isinstance(geolocator.image_processor, GeoCLIPImageProcessor)
    expected = _reference(checkpoint, photos, top_k=3)
    single = geolocator(photos[0], top_k=3)
    batched = geolocator(photos, top_k=3, batch_size=2)
    assert len(single) == 3 and len(batched) == len(photos)
    _assert_same_predictions(batched[0], single)
    for row, predictions in enumerate(batched):
        assert [p["latitude"] for p in predictions] == expected.latitudes[row].tolist()
        assert [p["longitude"] for p in predictions] == expected.longitudes[row].tolist()
        assert [p["probability"] for p in predictions] == pytest.approx(expected.probabilities[row].tolist(), abs=1e-6)
    pil_image = Image.open(photos[1])
    _assert_same_predictions(geolocator(pil_image, top_k=3), batched[1])
    assert len(geolocator(photos[0])) == 5  # default top_k


def test_pipeline_bad_inputs_raise(photos, geolocator, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg' is not an image file"):
        geolocator([photos[0], str(broken)], batch_size=2)
    with pytest.raises(ValueError, match="missing.jpg' does not exist"):
        geolocator(str(tmp_path / "missing.jpg"))
    with pytest.raises(ValueError, match=f"top_k must be between 1 and {len(GALLERY)}"):
        geolocator(photos[0], top_k=len(GALLERY) + 1)


# ------------------------------------------------------------------------------------------------- CLI
def test_predict_cli_json_matches_the_model(checkpoint, photos, capsys):
    assert predict.main([*photos, "--model", str(checkpoint), "--top-k", "2", "--batch-size", "2", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    expected = _reference(checkpoint, photos, top_k=2)
    assert [result["input"] for result in results] == photos
    for row, result in enumerate(results):
        assert [p["latitude"] for p in result["predictions"]] == expected.latitudes[row].tolist()


def test_predict_cli_text_and_gallery(checkpoint, capsys, tmp_path):
    gallery = tmp_path / "points.csv"
    gallery.write_text("Latitude,LONGITUDE\n10.5,20.25\n-30,40\n")
    argv = ["--text", "a beach", "--text", "snow", "--model", str(checkpoint), "--gallery", str(gallery), "--json"]
    assert predict.main([*argv, "--top-k", "2"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [result["input"] for result in results] == ["a beach", "snow"]
    for result in results:
        assert sorted((p["latitude"], p["longitude"]) for p in result["predictions"]) == [(-30.0, 40.0), (10.5, 20.25)]
        assert sum(p["probability"] for p in result["predictions"]) == pytest.approx(1.0, abs=1e-6)


def test_predict_cli_table_output(checkpoint, photos, capsys):
    assert predict.main([photos[0], "--model", str(checkpoint), "--top-k", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == photos[0] and lines[1].strip().startswith("1.") and "p=" in lines[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{photo}", "{missing}"], "missing.jpg' does not exist"),
        (["{photo}", "--top-k", "9"], f"top_k must be between 1 and {len(GALLERY)}"),
        (["{photo}", "--gallery", "{missing_csv}"], "points.csv' does not exist"),
    ],
)
def test_predict_cli_bad_input_is_a_readable_error(checkpoint, photos, tmp_path, capsys, argv, message):
    names = {"photo": photos[0], "missing": str(tmp_path / "missing.jpg"), "missing_csv": str(tmp_path / "points.csv")}
    assert cli.main(["predict", *[arg.format(**names) for arg in argv], "--model", str(checkpoint)]) == 1
    error = capsys.readouterr().err
    assert "geoloc predict: error:" in error and message in error and "Traceback" not in error


@pytest.mark.parametrize(
    "argv, message",
    [
        (["a.jpg", "--text", "x"], "give image files, --text queries or --dataset (one of them)"),
        (["--dataset", "d"], "--dataset needs --output"),
        (["--dataset", "d", "--output", "p.txt"], "--output must end in .csv or .parquet, got 'p.txt'"),
        (["a.jpg", "--output", "p.csv"], "--output is for --dataset"),
        (["a.jpg", "--top-k", "0"], "--top-k must be >= 1, got 0"),
        (["a.jpg", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["a.jpg", "--top-k", "three"], "invalid int value"),
    ],
)
def test_predict_cli_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_predict_without_input_runs_the_bundled_demo(capsys):
    """The README's first command: the bundled world-map model locates a map crop of the Sahara."""
    assert predict.main(["--json", "--top-k", "3"]) == 0
    captured = capsys.readouterr()
    [result] = json.loads(captured.out)
    best = result["predictions"][0]
    assert result["input"] == "demo crop (Sahara)" and len(result["predictions"]) == 3
    assert abs(best["latitude"] - predict.DEMO_LATITUDE) < 10 and abs(best["longitude"] - predict.DEMO_LONGITUDE) < 10
    assert "built-in demo" in captured.err and "the top prediction is" in captured.err


def test_predict_cli_missing_models(photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(geoloc.inference.adapter, "DEFAULT_MODEL", str(tmp_path / "not-built-yet"))
    assert cli.main(["predict", photos[0]]) == 1
    assert "bundled default model is not installed" in capsys.readouterr().err
    assert cli.main(["predict", photos[0], "--model", str(tmp_path / "nowhere")]) == 1
    assert "nowhere': no such folder" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- galleries
def test_load_gallery_sources_agree(tmp_path):
    expected = GALLERY[:3]
    (tmp_path / "upper.csv").write_text("LAT,LON\n" + "\n".join(f"{a!r},{b!r}" for a, b in expected.tolist()))
    (tmp_path / "mixed.csv").write_text("id,Longitude,LATITUDE\n" + "\n".join(
        f"{i},{b!r},{a!r}" for i, (a, b) in enumerate(expected.tolist())))
    dataset = datasets.Dataset.from_dict({"latitude": expected[:, 0], "longitude": expected[:, 1], "x": [1, 2, 3]})
    dataset.to_csv(tmp_path / "hub_like" / "train.csv", index=False)
    sources = [str(tmp_path / "upper.csv"), tmp_path / "mixed.csv", torch.tensor(expected), expected.tolist(),
               dataset, str(tmp_path / "hub_like")]
    for source in sources:
        gallery = load_gallery(source)
        assert gallery.dtype == np.float64 and np.array_equal(gallery, expected), source
    renamed = dataset.rename_columns({"latitude": "y", "longitude": "x2"})
    assert np.array_equal(load_gallery(renamed, columns=("y", "x2")), expected)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("LAT,LON\n", "no coordinates"),
        ("lat,long\n1,2\n", r"No coordinate columns among \['lat', 'long'\]"),
        ("LAT,LON\n1,2\n3,east\n", r"line 3: expected two numbers, got \['3', 'east'\]"),
        ("LAT,LON\n1,2\n95,2\n", r"\[1\] = \(95\.0, 2\.0\): latitude must be in \[-90, 90\]"),
        ("LAT,LON\n1,200\n", r"longitude must be in \[-180, 180\]"),
        ("LAT,LON\nnan,2\n", "must be finite"),
    ],
)
def test_load_gallery_bad_csv_raises(tmp_path, content, message):
    path = tmp_path / "gallery.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_gallery(path)


def test_load_gallery_bad_sources_raise(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_gallery(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="Cannot load the gallery dataset 'nobody/no-such-gallery'"):
        load_gallery("nobody/no-such-gallery")  # offline in tests: fails fast
    with pytest.raises(ValueError, match="at least one"):
        load_gallery(np.zeros((0, 2)))
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        load_gallery(np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"dataset\[1\] = \(nan, 2\.0\): coordinates must be finite"):
        load_gallery(datasets.Dataset.from_dict({"lat": [1.0, None], "lon": [2.0, 2.0]}))
    with pytest.raises(ValueError, match="has no column 'y'"):
        load_gallery(datasets.Dataset.from_dict({"lat": [1.0], "lon": [2.0]}), columns=("y", "lon"))
