"""Every entry point that loads a checkpoint works in a fresh Python, for both models: `geoloc predict` (files and
`--dataset`), `evaluate`, `publish --local-dir`, `convert` (GeoCLIP's official release), `train --model-config`
(GeoCLIP) and the Space's start.
In-process tests cannot show this: once one test imported both model packages, a command that forgot to register
them still passes. The commands start together (each in its own `python -m geoloc` process) to keep the file
fast; each test reads one command's result."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import save_tiny_geoclip
from official_geoclip import cached_official_wheel
from tests.test_geohier import synthetic_cells

REPO = Path(__file__).resolve().parents[1]
MODELS = ("geoclip", "geohier")
# A fresh interpreter that registers through the one function and loads a folder with the Auto classes.
LOAD_WITH_AUTO = ("import sys; from geoloc.models import register_models; register_models(); "
                  "from transformers import AutoModel; print(type(AutoModel.from_pretrained(sys.argv[1])).__name__)")
SPACE_START = ("import sys; sys.path.insert(0, sys.argv[1]); import app; "
               "print(','.join(type(g.model).__name__ for g in app.GEOLOCATORS.values()))")


def _geohier_checkpoint(folder):
    import torch

    from geoloc.configs import tiny_geohier_config, tiny_image_processor
    from modeling_geohier import GeoHierModel

    torch.manual_seed(0)
    model = GeoHierModel(tiny_geohier_config()).eval()
    model.set_cell_table(synthetic_cells())
    model.save_pretrained(folder)
    tiny_image_processor("geohier").save_pretrained(folder)


def _image_folder(folder: Path) -> Path:
    """Three small photos with coordinates (metadata.csv): a dataset for predict --dataset and evaluate."""
    folder.mkdir()
    rows = ["file_name,latitude,longitude"]
    for index, (lat, lon) in enumerate([(48.8, 2.3), (-33.9, 151.2), (40.7, -74.0)]):
        pixels = np.random.default_rng(index).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{index}.png")
        rows.append(f"photo{index}.png,{lat},{lon}")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


def _run(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                   "HF_DATASETS_CACHE": str(cwd / "datasets-cache"), "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.run([sys.executable, *arguments], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`{name: (CompletedProcess, work folder)}` of every command, each run in a fresh process."""
    work = tmp_path_factory.mktemp("fresh")
    models = {"geoclip": work / "geoclip", "geohier": work / "geohier"}
    save_tiny_geoclip(models["geoclip"], np.random.default_rng(0).uniform([-90, -180], [90, 180], size=(20, 2)))
    _geohier_checkpoint(models["geohier"])
    data = _image_folder(work / "photos")
    commands = {}
    for name, model in models.items():
        commands[f"predict {name}"] = ["-m", "geoloc", "predict", str(data / "photo0.png"), "--model", str(model),
                                       "--json", "--top-k", "3"]
        commands[f"predict --dataset {name}"] = ["-m", "geoloc", "predict", "--dataset", str(data), "--model",
                                                 str(model), "--output", str(work / f"{name}.csv"), "--top-k", "2"]
        commands[f"evaluate {name}"] = ["-m", "geoloc", "evaluate", "--model", str(model), "--dataset", str(data),
                                        "--output-dir", str(work / f"eval-{name}")]
        commands[f"publish {name}"] = ["-m", "geoloc", "publish", str(model), "--repo-id", f"me/{name}",
                                       "--local-dir", str(work / f"repo-{name}")]
    # Continuing from a checkpoint reads its image processor through AutoImageProcessor (GeoCLIP: GeoHier's
    # geocells would have to be rebuilt from three photos).
    commands["train geoclip"] = ["-m", "geoloc", "train", "--model", "geoclip", "--model-config",
                                 str(models["geoclip"]), "--dataset", str(data), "--output-dir", str(work / "trained"),
                                 "--max-steps", "1", "--batch-size", "3"]
    commands["space"] = ["-c", SPACE_START, str(REPO / "spaces" / "geolocation")]
    wheel = cached_official_wheel()
    if wheel is not None:
        commands["convert"] = ["-m", "geoloc", "convert", str(wheel), str(work / "encoder"), "--location-encoder-only"]
    previous = os.environ.get("GEOLOC_MODEL")
    os.environ["GEOLOC_MODEL"] = ",".join(map(str, models.values()))  # the Space serves both
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = {name: pool.submit(_run, arguments, work) for name, arguments in commands.items()}
            results = {name: future.result() for name, future in futures.items()}
    finally:
        os.environ.pop("GEOLOC_MODEL") if previous is None else os.environ.update(GEOLOC_MODEL=previous)
    return results, work


def _ok(runs, name) -> subprocess.CompletedProcess:
    result = runs[0][name]
    assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
    return result


@pytest.mark.parametrize("model", MODELS)
def test_predict_files(runs, model):
    answers = json.loads(_ok(runs, f"predict {model}").stdout)
    assert len(answers) == 1 and len(answers[0]["predictions"]) == 3 and answers[0]["error"] is None


@pytest.mark.parametrize("model", MODELS)
def test_predict_dataset(runs, model):
    assert "3 images geolocated" in _ok(runs, f"predict --dataset {model}").stdout
    lines = (runs[1] / f"{model}.csv").read_text().splitlines()
    assert lines[0].startswith("id,rank,latitude,longitude,probability") and len(lines) == 1 + 3 * 2


@pytest.mark.parametrize("model", MODELS)
def test_evaluate(runs, model):
    _ok(runs, f"evaluate {model}")
    assert json.loads((runs[1] / f"eval-{model}" / "metrics.json").read_text())["n"] == 3


@pytest.mark.parametrize("model", MODELS)
def test_publish_local_dir(runs, model):
    # The failure this file was written for: a GeoHier folder, in a process that imported no GeoHier code.
    _ok(runs, f"publish {model}")
    config = json.loads((runs[1] / f"repo-{model}" / "config.json").read_text())
    assert config["model_type"] == model and "AutoModel" in config["auto_map"]


def test_train_from_a_checkpoint(runs):
    assert "Saved the trained geoclip" in _ok(runs, "train geoclip").stderr
    assert (runs[1] / "trained" / "model.safetensors").is_file()


def test_space_starts_with_both_models(runs):
    assert _ok(runs, "space").stdout.strip().splitlines()[-1] == "GeoCLIPModel,GeoHierModel"


def test_convert_then_load_in_another_fresh_process(runs):
    if "convert" not in runs[0]:
        pytest.skip("the official geoclip 1.3.0 wheel is not cached: python tests/official_geoclip.py fetches it")
    _ok(runs, "convert")
    loaded = _run(["-c", LOAD_WITH_AUTO, str(runs[1] / "encoder")], runs[1])
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip().splitlines()[-1] == "GeoCLIPLocationEncoder"
