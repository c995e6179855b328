"""geoloc.train: one loop for both models, with checkpoints, exact resume, multi-process, cached features
and streaming.

Runs on tiny world-map crops; the multi-process and kill/resume tests start real `accelerate launch` /
`python -m geoloc.train` processes."""

import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

import geoloc  # noqa: F401
import modeling_geohier  # noqa: F401
from geoloc import train
from geoloc.data import GeoCollator, load_geo_dataset
from geoloc.train import build_parser, check_args, main, tiny_image_processor
from geoloc.worldmap import build_worldmap_splits, write_imagefolder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model-config", "tiny", "--batch-size", "16", "--learning-rate", "3e-3", "--warmup-steps", "5"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Train the tiny models on one torch thread (in-process runs; subprocesses get OMP_NUM_THREADS=1): their
    ops are too small to gain from intra-op threads, which only wait on each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def worldmap(tmp_path_factory):
    folder = tmp_path_factory.mktemp("worldmap")
    write_imagefolder(build_worldmap_splits(96, 16, seed=0), str(folder))
    return str(folder)


def run_module(args, launcher=(sys.executable, "-m"), env=None, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([*launcher, "geoloc.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def final_weights(output_dir):
    return load_file(os.path.join(output_dir, "model.safetensors"))


def fixed_batch_loss(model, dataset, rows=32):
    """Contrastive loss of `model` on the first rows, without the GPS queue."""
    batch = GeoCollator(tiny_image_processor())([dataset[i] for i in range(rows)])
    model.gps_queue_count.zero_()
    with torch.no_grad():
        return model(pixel_values=batch["pixel_values"], locations=batch["locations"], return_loss=True).loss.item()


def test_geoclip_trains_and_saves_a_loadable_model(worldmap, tmp_path):
    out = str(tmp_path / "run")
    assert main(["--model", "geoclip", "--dataset", worldmap, "--output-dir", out, "--max-steps", "40",
                 "--log-every", "10", "--checkpoint-every", "20", "--gps-noise-km", "25", *TINY]) == 0
    model = AutoModel.from_pretrained(out)
    assert type(model).__name__ == "GeoCLIPModel" and model.config.gallery_size == 96
    assert AutoImageProcessor.from_pretrained(out).crop_size == {"height": 32, "width": 32}
    assert AutoTokenizer.from_pretrained(out)("a desert").input_ids
    dataset = load_geo_dataset(worldmap)
    torch.manual_seed(0)
    untrained = AutoModel.from_config(model.config)
    assert fixed_batch_loss(model, dataset) < fixed_batch_loss(untrained, dataset) - 0.3
    logged = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [record["step"] for record in logged] == [10, 20, 30, 40]
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_00000020", "step_00000040"]


def test_killed_run_resumes_to_the_same_weights(worldmap, tmp_path):
    args = ["--model", "geoclip", "--dataset", worldmap, "--max-steps", "24", "--checkpoint-every", "4",
            "--gps-noise-km", "50", "--gradient-accumulation-steps", "2", *TINY]
    killed, reference = str(tmp_path / "killed"), str(tmp_path / "reference")
    process = run_module([*args, "--output-dir", killed])
    while not glob.glob(os.path.join(killed, "checkpoints", "step_*")):
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not os.path.exists(os.path.join(killed, "model.safetensors")), "the run ended before it was killed"
    for command, expected in (([*args, "--output-dir", killed, "--resume"], "Resumed from step"),
                              ([*args, "--output-dir", reference], "")):
        process = run_module(command)
        output = process.communicate()[0]
        assert process.returncode == 0 and expected in output, output
    resumed, uninterrupted = final_weights(killed), final_weights(reference)
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-6, rtol=0, msg=name)


def test_two_processes_share_the_work(worldmap, tmp_path):
    out = str(tmp_path / "ddp")
    # by module, with this interpreter: the `accelerate` executable need not be on PATH
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m")
    process = run_module(["--model", "geoclip", "--dataset", worldmap, "--output-dir", out, "--max-steps", "6",
                          "--checkpoint-every", "3", *TINY], launcher=launcher, env={"ACCELERATE_USE_CPU": "1"})
    output = process.communicate(timeout=240)[0]
    assert process.returncode == 0, output
    summary = json.load(open(os.path.join(out, "train_summary.json")))
    assert summary["num_processes"] == 2 and summary["samples_per_process"] == [96, 96]
    assert sorted(os.listdir(os.path.join(out, "checkpoints", "step_00000006"))) == [
        "model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "scheduler.bin"]
    model = AutoModel.from_pretrained(out)
    assert int(model.gps_queue_count) == 6 * 2 * 16  # every process enqueued both processes' coordinates


def test_cached_features_train_like_raw_images(worldmap, tmp_path):
    args = ["--model", "geoclip", "--dataset", worldmap, "--max-steps", "12", "--checkpoint-every", "100", *TINY]
    cache = str(tmp_path / "cache")
    main([*args, "--output-dir", str(tmp_path / "raw")])
    main([*args, "--output-dir", str(tmp_path / "cached"), "--cache-features", "--cache-dir", cache])
    entries = os.listdir(cache)
    main([*args, "--output-dir", str(tmp_path / "cached2"), "--cache-features", "--cache-dir", cache])
    assert os.listdir(cache) == entries and len(entries) == 1  # computed once, reused
    raw, cached = final_weights(str(tmp_path / "raw")), final_weights(str(tmp_path / "cached"))
    for name in raw:
        torch.testing.assert_close(cached[name], raw[name], atol=1e-4, rtol=1e-4, msg=name)


def test_invalid_rows_are_counted_and_skipped(worldmap, tmp_path, caplog):
    folder = tmp_path / "data"
    folder.mkdir()
    lines = ["file_name,latitude,longitude"]
    for index, line in enumerate(open(os.path.join(worldmap, "train", "metadata.csv")).read().splitlines()[1:33]):
        name = line.split(",")[0]
        Image.open(os.path.join(worldmap, "train", name)).save(folder / name)
        lines.append(line if index != 3 else f"{name},123.0,0.0")
    (folder / "broken.png").write_bytes(b"\x89PNG truncated")
    lines.append("broken.png,10.0,10.0")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "run")
    main(["--model", "geoclip", "--dataset", str(folder), "--output-dir", out, "--max-steps", "4",
          "--checkpoint-every", "100", *TINY])
    summary = json.load(open(os.path.join(out, "train_summary.json")))
    assert summary["train_rows"] == 32  # 33 rows, one with latitude 123 dropped
    assert summary["skipped_images_per_process"] == [2]  # the broken image, once per epoch (2 epochs)
    assert "Skipping 1 of 33 rows with invalid coordinates" in caplog.text


def test_geohier_trains_with_geocells(worldmap, tmp_path):
    out = str(tmp_path / "geohier")
    main(["--model", "geohier", "--dataset", worldmap, "--output-dir", out, "--max-steps", "30", "--log-every", "5",
          "--checkpoint-every", "100", "--geocell-levels", "2:40,2:20,2:10", *TINY])
    logged = [json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))]
    assert logged[-1] < logged[0]
    model = AutoModel.from_pretrained(out)
    assert type(model).__name__ == "GeoHierModel" and model.config.has_cell_table
    pixel_values = AutoImageProcessor.from_pretrained(out)(np.zeros((32, 32, 3), np.uint8),
                                                          return_tensors="pt").pixel_values
    assert model.geolocate(pixel_values=pixel_values, top_k=3).latitudes.shape == (1, 3)


@pytest.fixture(scope="module")
def parquet_shards(worldmap, tmp_path_factory):
    """The world-map training split as 3 self-contained parquet shards (image bytes inside)."""
    folder = tmp_path_factory.mktemp("shards")
    dataset = load_geo_dataset(worldmap).map(
        lambda row: {"image": {"bytes": pathlib.Path(row["image"]["path"]).read_bytes(), "path": None}})
    for index in range(3):
        dataset.shard(3, index).to_parquet(str(folder / f"train-{index:05d}.parquet"))
    return str(folder)


class Stopped(Exception):
    """Raised right after the first checkpoint to stop a run as a kill would."""


def test_streaming_run_resumes_to_the_same_weights(parquet_shards, tmp_path, monkeypatch):
    args = ["--model", "geoclip", "--dataset", parquet_shards, "--streaming", "--shuffle-buffer", "24",
            "--max-steps", "8", "--checkpoint-every", "4", "--gps-noise-km", "50",
            "--gradient-accumulation-steps", "2", *TINY]
    stopped, reference = str(tmp_path / "stopped"), str(tmp_path / "reference")
    # datasets waits 5 s for its reader threads after each full pass over parquet shards (an Arrow shutdown
    # workaround); this process keeps running, so no need to wait
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    save_checkpoint = train.save_checkpoint

    def save_then_stop(*save_args, **save_kwargs):
        save_checkpoint(*save_args, **save_kwargs)
        raise Stopped

    with monkeypatch.context() as patch:
        patch.setattr(train, "save_checkpoint", save_then_stop)
        with pytest.raises(Stopped):
            main([*args, "--output-dir", stopped])
    # 96 rows = 6 batches of 16 = 3 steps per epoch: step 4 is 2 micro-batches into the second epoch
    position = pathlib.Path(stopped, "checkpoints", "step_00000004", "stream_position_0.json").read_text()
    assert json.loads(position) == {"epoch": 1, "batches": 2}
    assert main([*args, "--output-dir", stopped, "--resume"]) == 0
    assert main([*args, "--output-dir", reference]) == 0
    resumed, uninterrupted = final_weights(stopped), final_weights(reference)
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-6, rtol=0, msg=name)
    summary = json.loads(pathlib.Path(reference, "train_summary.json").read_text())
    assert summary["train_rows"] == 96 and summary["samples_per_process"] == [8 * 2 * 16]
    assert AutoModel.from_pretrained(reference).config.gallery_size == 96


def test_geohier_streams_an_image_folder(worldmap, tmp_path):
    out = str(tmp_path / "geohier")
    assert main(["--model", "geohier", "--dataset", worldmap, "--streaming", "--output-dir", out, "--max-steps",
                 "4", "--checkpoint-every", "100", "--geocell-levels", "2:40,2:20,2:10", *TINY]) == 0
    assert AutoModel.from_pretrained(out).config.has_cell_table


def test_cli_contract_and_argument_errors(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "--model-config" in capsys.readouterr().out
    base = ["--model", "geoclip", "--dataset", "d", "--output-dir", "o"]
    for extra, message in ((["--max-steps", "0"], "--max-steps"), (["--train-fraction", "1.5"], "train-fraction"),
                           (["--model", "geohier", "--cache-features"], "GeoCLIP options"),
                           (["--streaming", "--cache-features"], "not with --streaming")):
        with pytest.raises(ValueError, match=message):
            check_args(build_parser().parse_args(base + extra))
