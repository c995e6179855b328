"""The same `geoloc train` command and seed give bit-identical weights on a quiet and on a busy machine, and a
resumed run ends with the weights of an uninterrupted one even where the environment asks for other threads:
training's thread count never depends on the load, is recorded in the run settings, and `--resume` reuses it."""

import json
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file

from geoloc.cli import main as geoloc
from geoloc.threads import available_cores
from geoloc.data.worldmap import build_worldmap_splits, write_imagefolder

TRAIN = ["--model", "geoclip", "--model-config", "tiny", "--batch-size", "8", "--max-steps", "6",
         "--checkpoint-every", "3", "--checkpoints-to-keep", "2", "--warmup-steps", "2", "--gps-noise-km", "50",
         "--augmentation", "map", "--log-every", "3"]


@pytest.fixture(scope="module")
def worldmap(tmp_path_factory):
    folder = tmp_path_factory.mktemp("worldmap")
    write_imagefolder(build_worldmap_splits(32, 4, seed=0), str(folder))
    return str(folder)


@pytest.fixture(autouse=True)
def _no_thread_setting(monkeypatch):
    """No OMP_NUM_THREADS and no process count: the run picks its threads itself (the case that depended on the
    load); torch's threads are restored afterwards."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@contextmanager
def busy_machine():
    """One busy-loop process per core (what made the load-aware picker choose fewer threads)."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(available_cores())]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def train(worldmap, output_dir, *extra) -> dict:
    assert geoloc(["train", *TRAIN, "--dataset", worldmap, "--output-dir", str(output_dir), *extra]) == 0
    return load_file(str(output_dir / "model.safetensors"))


def assert_identical(first: dict, second: dict):
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_same_weights_on_a_busy_machine_and_after_a_resume(worldmap, tmp_path, monkeypatch):
    quiet = train(worldmap, tmp_path / "quiet")
    summary = json.loads((tmp_path / "quiet" / "train_summary.json").read_text())
    assert summary["threads"] == available_cores() == summary["args"]["threads"]
    with busy_machine():
        assert_identical(train(worldmap, tmp_path / "busy"), quiet)

    # Resume from the first checkpoint of the quiet run, where the environment now asks for other threads.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "quiet" / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    recorded = json.loads((resumed / "checkpoints" / "step_00000003" / "run_settings.json").read_text())["threads"]
    assert recorded == available_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", str(recorded + 1))
    assert_identical(train(worldmap, resumed, "--resume"), quiet)
    assert json.loads((resumed / "train_summary.json").read_text())["threads"] == recorded


def test_resume_refuses_other_threads_than_recorded(worldmap, tmp_path, capsys):
    train(worldmap, tmp_path / "run", "--threads", "1", "--max-steps", "3")
    assert geoloc(["--threads", "2", "train", *TRAIN, "--max-steps", "3", "--dataset", worldmap, "--output-dir",
                   str(tmp_path / "run"), "--resume"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"geoloc train: error: --threads 2: the run in {tmp_path / 'run'} trained with 1 threads and resumes with "
        "them (its weights would differ otherwise); leave --threads out.")
