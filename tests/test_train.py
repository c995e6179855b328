"""geoloc.training.train: one loop for both models, with recipes, checkpoints, exact resume, multi-process (one big
batch), cached features, streaming, scene labels, geocell tables, pretrained backbones and hostile data.

Runs on tiny world-map crops; the multi-process and kill/resume tests start real `accelerate launch` /
`python -m geoloc.training.train` processes (through `sys.executable`, so the venv need not be on PATH)."""

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

from conftest import accelerate_launch
from geoloc.models import register_models
from geoloc import cli
from geoloc.training import train
from geoloc.configs import tiny_clip_configs, tiny_image_processor
from geoloc.data.dataset import GeoCollator, decode_image, load_geo_dataset
from geoloc.training.recipes import RECIPE_OPTIONS, RECIPES, get_recipe
from geoloc.training.tasks import TRAINING_TASKS
from geoloc.training.train import build_parser, main, resolve_args
from geoloc.data.worldmap import build_worldmap_splits, write_imagefolder

register_models()  # the Auto classes below read GeoCLIP and GeoHier checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model-config", "tiny", "--batch-size", "16", "--warmup-steps", "5"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Train the tiny models on one torch thread (`geoloc train` reads OMP_NUM_THREADS in-process; subprocesses
    get it too): their ops are too small to gain from intra-op threads, which only wait on each other on a busy
    machine."""
    threads, previous = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    os.environ.pop("OMP_NUM_THREADS") if previous is None else os.environ.update(OMP_NUM_THREADS=previous)


@pytest.fixture(scope="module")
def worldmap(tmp_path_factory):
    folder = tmp_path_factory.mktemp("worldmap")
    write_imagefolder(build_worldmap_splits(96, 16, seed=0), str(folder))
    return str(folder)


def crop_scene(image) -> int:
    """A learnable scene rule for world-map crops: 0 water (blue), 1 ice or snow (bright), 2 other land."""
    red, green, blue = np.asarray(image.convert("RGB"), dtype=float).reshape(-1, 3).mean(0)
    return 0 if blue - red > 25 else 1 if min(red, green, blue) > 190 else 2


@pytest.fixture(scope="module")
def scene_dataset(tmp_path_factory):
    """World-map crops with a `scene` column, made as the README's labelling snippet makes one (a batched
    `Dataset.map` over `load_geo_dataset` rows, then `save_to_disk`), and held-out crops with their scenes."""
    folder = tmp_path_factory.mktemp("scenes")
    write_imagefolder(build_worldmap_splits(600, 200, seed=1), str(folder / "images"))
    data = load_geo_dataset(str(folder / "images"))

    def label_scenes(batch):
        return {"scene": [crop_scene(decode_image(image)) for image in batch["image"]]}

    data.map(label_scenes, batched=True, batch_size=64).save_to_disk(str(folder / "with-scenes"))
    return str(folder / "with-scenes"), load_geo_dataset(str(folder / "images"), split="test")


def run_module(args, launcher=(sys.executable, "-m"), env=None, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([*launcher, "geoloc.training.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def finish(process, timeout: float) -> str:
    """The output of a `run_module` process; killed (with its ranks, which end with their launcher) if it
    outlives `timeout`, so that a hung run fails its test instead of holding the machine."""
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def final_weights(output_dir):
    return load_file(os.path.join(output_dir, "model.safetensors"))


def assert_same_weights(first, second, atol=1e-6):
    first, second = final_weights(first), final_weights(second)
    assert first.keys() == second.keys()
    for name in second:
        torch.testing.assert_close(first[name], second[name], atol=atol, rtol=0, msg=name)


def fixed_batch_loss(model, dataset, rows=32):
    """Contrastive loss of `model` on the first rows, without the GPS queue."""
    batch = GeoCollator(tiny_image_processor())([dataset[i] for i in range(rows)])
    model.gps_queue_count.zero_()
    with torch.no_grad():
        return model(pixel_values=batch["pixel_values"], locations=batch["locations"], return_loss=True).loss.item()


# ----------------------------------------------------------------------------------------------- recipes
def test_recipes_fill_what_the_command_line_leaves_open():
    args = resolve_args(build_parser().parse_args(["--model", "geoclip", "--dataset", "d", "--output-dir", "o"]))
    tiny = RECIPES["geoclip-tiny"]
    assert (args.recipe, args.batch_size, args.max_steps, args.train_backbone) == (
        "geoclip-tiny", tiny.batch_size, tiny.max_steps, True)
    args = resolve_args(build_parser().parse_args(
        ["--recipe", "geoclip-paper", "--dataset", "d", "--output-dir", "o", "--learning-rate", "1e-4",
         "--max-steps", "7"]))
    assert args.model == "geoclip" and args.learning_rate == 1e-4 and args.max_steps == 7 and args.epochs is None
    assert (args.optimizer, args.batch_size, args.queue_size, args.backbone) == (
        "adam", 512, 4096, "openai/clip-vit-large-patch14")
    args = resolve_args(build_parser().parse_args(
        ["--recipe", "geodecoder-paper", "--dataset", "d", "--output-dir", "o", "--model-config", "tiny",
         "--geocells", "cells.json"]))
    assert args.backbone is None and args.epochs == 40 and args.label_smoothing == 0.1


def test_each_task_declares_the_options_its_recipes_set():
    """A recipe's model options are its task's (a third model adds its task, its options and its recipes, and
    nothing in the shared loop or the other tasks)."""
    for recipe in RECIPES.values():
        task = TRAINING_TASKS[recipe.model]
        assert set(recipe.model_options) <= set(task.recipe_options), recipe.name
        assert get_recipe(task.default_recipe).model == recipe.model
    shared = set(RECIPE_OPTIONS)
    geoclip, geohier = (set(TRAINING_TASKS[name].recipe_options) for name in ("geoclip", "geohier"))
    assert not (geoclip & geohier) and not (shared & (geoclip | geohier))


@pytest.mark.parametrize(("recipe", "extra", "expected"), [
    ("geoclip-paper", [], {"model": "geoclip", "optimizer": "adam", "batch_size": 512, "queue_size": 4096,
                       "gps_noise_km": 0.15, "queue_noise_km": 1.0, "epochs": 10, "decay_gamma": 0.87,
                       "augmentation": "photo", "backbone": "openai/clip-vit-large-patch14"}),
    ("geodecoder-paper", ["--geocells", "mp16-cells.json"],
     {"model": "geohier", "optimizer": "sgd", "batch_size": 256, "epochs": 40, "label_smoothing": 0.1,
      "scene_label_smoothing": 0.1, "backbone": "google/vit-base-patch16-224-in21k"}),
])
def test_dry_run_prints_every_resolved_option_without_loading_anything(recipe, extra, expected, capsys):
    # Neither the dataset, the cell table nor the backbone exists here (no network): nothing is loaded.
    argv = ["--recipe", recipe, "--dry-run", "--dataset", "/no/such/dataset", "--learning-rate", "0.25", *extra]
    assert main(argv) == 0
    settings = json.loads(capsys.readouterr().out)
    assert settings["recipe"] == recipe and settings["learning_rate"] == 0.25
    assert {key: settings[key] for key in expected} == expected
    assert set(settings) >= {"seed", "max_grad_norm", "weight_decay", "schedule", "warmup_steps", "output_dir"}
    with pytest.raises(ValueError, match="required: --dataset, --output-dir"):
        resolve_args(build_parser().parse_args(["--recipe", recipe]))


@pytest.mark.parametrize("start", [(0.0, 0.0), (89.99, 30.0), (-45.0, 179.999)])
def test_gps_noise_moves_points_by_true_distances_on_the_sphere(start):
    from geoloc.geography.geodesy import geodesic_distance_km
    from geoloc.training.geoclip_loss import add_gps_noise

    torch.manual_seed(0)
    locations = torch.tensor([start], dtype=torch.float64).repeat(20_000, 1)
    assert add_gps_noise(locations, 0.0) is locations
    moved = add_gps_noise(locations, 1.0).numpy()
    assert (np.abs(moved[:, 0]) <= 90).all() and (moved[:, 1] >= -180).all() and (moved[:, 1] < 180).all()
    distances = geodesic_distance_km(locations[:, 0].numpy(), locations[:, 1].numpy(), moved[:, 0], moved[:, 1])
    # 2-D Gaussian of 1 km per axis: E[d^2] = 2 km^2 (WGS84 vs the sphere: well under 1 %).
    assert np.mean(distances**2) == pytest.approx(2.0, rel=0.04)
    assert np.median(distances) == pytest.approx(np.sqrt(2 * np.log(2)), rel=0.03)  # Rayleigh median


def test_batch_noise_stays_out_of_the_queue_and_queue_noise_goes_in(worldmap, tmp_path):
    truth = load_geo_dataset(worldmap)
    points = torch.tensor(np.stack([truth["latitude"], truth["longitude"]], axis=1))
    args = ["--model", "geoclip", "--dataset", worldmap, "--max-steps", "2", "--augmentation", "none", *TINY]
    nearest_km = {}
    for name, noise in (("batch", ["--gps-noise-km", "500", "--queue-noise-km", "0"]),
                        ("queue", ["--gps-noise-km", "0", "--queue-noise-km", "20"])):
        assert main([*args, *noise, "--output-dir", str(tmp_path / name)]) == 0
        model = AutoModel.from_pretrained(tmp_path / name)
        queue = model.gps_queue[: int(model.gps_queue_count)]
        assert len(queue) == 32
        nearest_km[name] = torch.cdist(queue, points).min(dim=1).values * 111.2  # ~km at these scales
    assert nearest_km["batch"].max() < 1e-3  # the queue got the true locations, not the 500 km noised ones
    assert 5 < nearest_km["queue"].median() < 60  # ...and its own 20 km draw when asked


@pytest.mark.parametrize(("extra", "message"), [
    (["--max-steps", "0"], "--max-steps"),
    (["--train-fraction", "1.5"], "train-fraction"),
    (["--model", "geohier", "--cache-features"], "is a GeoCLIP option"),
    (["--model", "geohier", "--gps-noise-km", "1"], "--gps-noise-km is a geoclip option, not one of geohier"),
    (["--model", "geoclip", "--loss-scale", "2"], "--loss-scale is a geohier option, not one of geoclip"),
    (["--streaming", "--cache-features", "--no-train-backbone"], "not with --streaming"),
    (["--cache-features"], "needs a frozen image tower"),
    (["--recipe", "geodecoder-paper"], "trains geohier, not --model geoclip"),
    (["--model", "geohier", "--recipe", "geodecoder-paper"], "geoloc geocells import cells_50_5000.csv"),
    (["--model", "geohier", "--level-loss-weights", "1,x"], "--level-loss-weights"),
    (["--model", "geohier", "--loss-scale", "0"], "--loss-scale"),
    (["--model", "geohier", "--scene-label-smoothing", "1"], "--scene-label-smoothing"),
    (["--max-steps", "5", "--epochs", "2"], "not both"),
    (["--backbone", "x", "--model-config", "tiny"], "not both"),
    (["--resume", "--overwrite"], "pick one"),
])
def test_argument_errors_name_the_option(extra, message):
    base = ["--model", "geoclip", "--dataset", "d", "--output-dir", "o"]
    argv = base + extra if "--model" not in extra else ["--dataset", "d", "--output-dir", "o"] + extra
    with pytest.raises(ValueError, match=message):
        resolve_args(build_parser().parse_args(argv))


def test_help_lists_recipes_and_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "geoclip-paper" in text and "geodecoder-paper" in text and "(default: 500)" in text


# ------------------------------------------------------------------------------------------------ GeoCLIP
def test_geoclip_trains_and_saves_a_loadable_model(worldmap, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["--model", "geoclip", "--dataset", worldmap, "--output-dir", out, "--max-steps", "40",
                 "--log-every", "10", "--checkpoint-every", "20", "--gps-noise-km", "0", "--queue-noise-km", "0",
                 "--augmentation", "none",
                 "--no-train-backbone", *TINY, "--learning-rate", "3e-3"]) == 0
    assert f"Saved the trained geoclip to {out}" in capsys.readouterr().err
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
    settings = json.load(open(os.path.join(out, "checkpoints", "step_00000040", "run_settings.json")))
    assert settings["batch_size"] == 16 and settings["max_steps"] == 40 and settings["train_rows"] == 96


def test_killed_run_resumes_to_the_same_weights(worldmap, tmp_path):
    # Image augmentation and GPS noise are on: their draws must be the same in the resumed run.
    args = ["--model", "geoclip", "--dataset", worldmap, "--max-steps", "24", "--checkpoint-every", "4",
            "--gps-noise-km", "50", "--gradient-accumulation-steps", "2", "--augmentation", "map", *TINY]
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
    assert_same_weights(killed, reference)


def test_processes_and_accumulation_train_as_one_big_batch(worldmap, tmp_path):
    """1 process x 16 images = 1 process x 2 accumulated micro-batches of 8 = 2 processes x 2 micro-batches of 4:
    the same global batches, every image against all 16 locations of its step and the queue as it was before the
    step, the queue updated once per step with the 16 locations in the same order, so the same weights and the
    same queue. Augmentation and GPS noise are off (they draw per process), and so is the tiny tower's training:
    its attention key biases get a gradient of ~0 (softmax ignores them) that Adam blows up to full steps of
    float noise, different for every summation order."""
    args = ["--model", "geoclip", "--dataset", worldmap, "--max-steps", "6", "--checkpoint-every", "3",
            "--augmentation", "none", "--gps-noise-km", "0", "--queue-noise-km", "0", "--no-train-backbone", *TINY]
    two, accumulated, one = str(tmp_path / "two"), str(tmp_path / "accumulated"), str(tmp_path / "one")
    process = run_module([*args, "--output-dir", two, "--gradient-accumulation-steps", "2"], launcher=[*accelerate_launch(), "-m"],
                         env={"ACCELERATE_USE_CPU": "1"})
    output = finish(process, timeout=300)
    assert process.returncode == 0, output
    assert main([*args, "--output-dir", accumulated, "--gradient-accumulation-steps", "2"]) == 0
    assert main([*args, "--output-dir", one]) == 0
    summary = json.load(open(os.path.join(two, "train_summary.json")))
    assert summary["num_processes"] == 2 and summary["samples_per_process"] == [48, 48]
    assert sorted(os.listdir(os.path.join(two, "checkpoints", "step_00000006"))) == [
        "model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "run_settings.json",
        "scheduler.bin", "stream_position_0.json", "stream_position_1.json"]
    reference = AutoModel.from_pretrained(one)
    assert int(reference.gps_queue_count) == 6 * 16
    for run in (two, accumulated):
        model = AutoModel.from_pretrained(run)
        assert torch.equal(model.gps_queue_coordinates, reference.gps_queue_coordinates), run
        assert int(model.gps_queue_ptr) == int(reference.gps_queue_ptr)
        assert_same_weights(run, one, atol=2e-5)


def test_cached_features_train_like_raw_images(worldmap, tmp_path):
    args = ["--model", "geoclip", "--dataset", worldmap, "--max-steps", "12", "--checkpoint-every", "100",
            "--no-train-backbone", "--augmentation", "none", *TINY]
    cache = str(tmp_path / "cache")
    main([*args, "--output-dir", str(tmp_path / "raw")])
    main([*args, "--output-dir", str(tmp_path / "cached"), "--cache-features", "--cache-dir", cache])
    entries = os.listdir(cache)
    main([*args, "--output-dir", str(tmp_path / "cached2"), "--cache-features", "--cache-dir", cache])
    assert os.listdir(cache) == entries and len(entries) == 1  # computed once, reused
    assert_same_weights(str(tmp_path / "cached"), str(tmp_path / "raw"), atol=1e-4)


def test_pretrained_clip_backbone_is_loaded_frozen_with_fresh_heads(worldmap, tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from geoloc.configs import byte_level_clip_tokenizer

    vision, text = tiny_clip_configs()
    backbone = tmp_path / "clip"
    clip = CLIPModel(CLIPConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), projection_dim=64))
    clip.save_pretrained(backbone)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(backbone)
    byte_level_clip_tokenizer().save_pretrained(backbone)
    out = str(tmp_path / "run")
    assert main(["--model", "geoclip", "--dataset", worldmap, "--output-dir", out, "--backbone", str(backbone),
                 "--no-train-backbone", "--max-steps", "4", "--batch-size", "16", "--checkpoint-every", "100"]) == 0
    model = AutoModel.from_pretrained(out)
    assert model.config.backbone == str(backbone) and model.config.freeze_backbone
    pretrained = clip.state_dict()
    for key, value in model.image_tower.state_dict().items():  # frozen: still the pretrained weights
        torch.testing.assert_close(value, pretrained[key], rtol=0, atol=0, msg=key)
    assert AutoImageProcessor.from_pretrained(out).crop_size == {"height": 32, "width": 32}


# ----------------------------------------------------------------------------------- runs, folders, data
def test_a_used_output_folder_needs_resume_or_overwrite(worldmap, tmp_path):
    out = str(tmp_path / "run")
    args = ["--model", "geoclip", "--dataset", worldmap, "--output-dir", out, "--max-steps", "4",
            "--checkpoint-every", "2", *TINY]
    assert main(args) == 0
    with pytest.raises(ValueError, match="already holds a training run.*--resume.*--overwrite"):
        main(args)
    with pytest.raises(ValueError, match=r"batch_size=16 \(now 32\)"):
        main([*args, "--resume", "--batch-size", "32", "--max-steps", "6"])
    assert main([*args, "--overwrite", "--max-steps", "2"]) == 0
    assert os.listdir(os.path.join(out, "checkpoints")) == ["step_00000002"]
    assert json.load(open(os.path.join(out, "train_summary.json")))["steps"] == 2


def test_push_to_hub_uploads_what_publish_uploads_never_training_state(worldmap, tmp_path, monkeypatch):
    from geoloc.hub import publish

    commits = []

    class Recorder:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            pass

        def create_commit(self, repo_id, operations, **kwargs):
            commits.append((repo_id, sorted(op.path_in_repo for op in operations)))
            return type("CommitInfo", (), {"pr_url": None, "commit_url": "https://hub/commit"})()

    monkeypatch.setattr(publish, "HfApi", Recorder)
    out = str(tmp_path / "run")
    assert main(["--model", "geoclip", "--dataset", worldmap, "--output-dir", out, "--max-steps", "2",
                 "--checkpoint-every", "1", "--push-to-hub", "me/geoclip-tiny", *TINY]) == 0
    assert os.path.isdir(os.path.join(out, "checkpoints")) and os.path.isfile(os.path.join(out, "log.jsonl"))
    (repo, files), = commits
    assert repo == "me/geoclip-tiny"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "modeling_geoclip.py"} <= set(files)
    assert not [name for name in files if name.startswith(("checkpoints", "log", "train_summary", "tensorboard"))]


def test_invalid_rows_and_unreadable_images_are_counted_and_skipped(worldmap, tmp_path, caplog):
    folder = tmp_path / "data"
    folder.mkdir()
    lines = ["file_name,latitude,longitude"]
    for index, line in enumerate(open(os.path.join(worldmap, "train", "metadata.csv")).read().splitlines()[1:9]):
        name = line.split(",")[0]
        Image.open(os.path.join(worldmap, "train", name)).save(folder / name)
        lines.append(line if index != 3 else f"{name},123.0,0.0")
    (folder / "broken.png").write_bytes(b"\x89PNG truncated")
    lines.append("broken.png,10.0,10.0")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "run")
    # Batches of one image: the broken one makes an empty micro-batch, which is skipped.
    assert main(["--model", "geoclip", "--dataset", str(folder), "--output-dir", out, "--max-steps", "16",
                 "--checkpoint-every", "100", "--model-config", "tiny", "--batch-size", "1"]) == 0
    summary = json.load(open(os.path.join(out, "train_summary.json")))
    assert summary["train_rows"] == 8  # 9 rows, one with latitude 123 dropped
    assert summary["steps"] == 16 and summary["samples_per_process"] == [16]
    assert summary["unreadable_images_per_process"][0] in (2, 3)  # the broken image, once per epoch
    assert "Skipping 1 of 9 rows with invalid coordinates" in caplog.text


# ------------------------------------------------------------------------------------------------ GeoHier
def test_geohier_trains_with_geocells(worldmap, tmp_path):
    out = str(tmp_path / "geohier")
    main(["--model", "geohier", "--dataset", worldmap, "--output-dir", out, "--max-steps", "30", "--log-every", "5",
          "--checkpoint-every", "100", "--geocell-levels", "2:40,2:20,2:10", *TINY])
    logged = [json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))]
    assert logged[-1] < logged[0]
    model = AutoModel.from_pretrained(out)
    assert type(model).__name__ == "GeoHierModel" and model.config.has_cell_table
    assert not model.config.trained_with_scene_labels
    processor = AutoImageProcessor.from_pretrained(out)
    assert type(processor).__name__ == "GeoHierImageProcessor"
    pixel_values = processor(np.zeros((32, 32, 3), np.uint8), return_tensors="pt").pixel_values
    assert model.geolocate(pixel_values=pixel_values, top_k=3).latitudes.shape == (1, 3)


@pytest.mark.parametrize(("model", "precision"), [("geoclip", "fp16"), ("geohier", "bf16")])
def test_mixed_precision_trains_and_saves(worldmap, tmp_path, model, precision):
    out = str(tmp_path / "run")
    levels = ["--geocell-levels", "2:80,2:40"] if model == "geohier" else []
    assert main(["--model", model, "--dataset", worldmap, "--output-dir", out, "--max-steps", "4", "--log-every", "1",
                 "--checkpoint-every", "100", "--mixed-precision", precision, *levels, *TINY]) == 0
    losses = [json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))]
    assert len(losses) == 4 and all(np.isfinite(losses))
    loaded = AutoModel.from_pretrained(out)
    assert all(torch.isfinite(parameter).all() for parameter in loaded.parameters())


def test_geohier_auto_levels_and_cell_table_files(tmp_path):
    folder = tmp_path / "data"
    write_imagefolder(build_worldmap_splits(800, 0, seed=2), str(folder))
    out = str(tmp_path / "auto")
    assert main(["--model", "geohier", "--dataset", str(folder), "--output-dir", out, "--max-steps", "2",
                 "--checkpoint-every", "100", "--model-config", "tiny", "--batch-size", "16"]) == 0
    cells = AutoModel.from_pretrained(out).config.cells_per_level
    assert len(cells) == 3 and cells[0] >= 6 and cells[0] < cells[1] < cells[2] and cells[2] >= 40, cells
    # A table from `geoloc geocells build` (any number of levels) trains as it is.
    table = tmp_path / "cells.json"
    assert cli.main(["geocells", "build", "--dataset", str(folder), "--levels", "1:200,1:50",
                            "--output", str(table)]) == 0
    out = str(tmp_path / "table")
    assert main(["--model", "geohier", "--dataset", str(folder), "--output-dir", out, "--max-steps", "2",
                 "--checkpoint-every", "100", "--model-config", "tiny", "--batch-size", "16",
                 "--geocells", str(table)]) == 0
    model = AutoModel.from_pretrained(out)
    saved = json.loads(table.read_text())["levels"]
    assert model.config.cells_per_level == [len(level["tokens"]) for level in saved] and model.config.num_levels == 2
    assert model.get_cell_table()[1]["tokens"] == saved[1]["tokens"]


def test_too_little_data_for_the_geocell_levels_is_one_clear_error(worldmap, tmp_path):
    with pytest.raises(ValueError, match=r"96 training points give \[.*\] geocells.*at least 2 cells.*--geocell-levels"):
        main(["--model", "geohier", "--dataset", worldmap, "--output-dir", str(tmp_path / "x"), "--max-steps", "2",
              "--geocell-levels", "100:5000", *TINY])


def test_geohier_learns_scenes_from_a_scene_column(scene_dataset, tmp_path):
    saved, test = scene_dataset
    out = str(tmp_path / "scenes")
    assert main(["--model", "geohier", "--dataset", saved, "--output-dir", out, "--max-steps", "150",
                 "--checkpoint-every", "1000", "--model-config", "tiny", "--batch-size", "32",
                 "--learning-rate", "2e-3"]) == 0
    model = AutoModel.from_pretrained(out).eval()
    assert model.config.trained_with_scene_labels and model.config.num_scenes == 4
    images = [decode_image(image) for image in test["image"]]
    truth = np.array([crop_scene(image) for image in images])
    pixel_values = AutoImageProcessor.from_pretrained(out)(images, return_tensors="pt").pixel_values
    predicted = model.geolocate(pixel_values=pixel_values).selected_scenes.numpy()
    majority = np.bincount(truth).max() / len(truth)
    assert (predicted == truth).mean() > majority + 0.1, ((predicted == truth).mean(), majority)


@pytest.mark.parametrize("with_scenes", [False, True])
def test_geohier_trains_on_two_processes(worldmap, scene_dataset, tmp_path, with_scenes):
    out = str(tmp_path / "ddp")
    dataset = scene_dataset[0] if with_scenes else worldmap
    process = run_module(["--model", "geohier", "--dataset", dataset, "--output-dir", out, "--max-steps", "4",
                          "--checkpoint-every", "100", "--geocell-levels", "2:80,2:40", *TINY],
                         launcher=[*accelerate_launch(), "-m"], env={"ACCELERATE_USE_CPU": "1"})
    output = finish(process, timeout=300)
    assert process.returncode == 0, output
    summary = json.load(open(os.path.join(out, "train_summary.json")))
    assert summary["num_processes"] == 2 and summary["samples_per_process"] == [32, 32]
    assert AutoModel.from_pretrained(out).config.trained_with_scene_labels == with_scenes


# ---------------------------------------------------------------------------------------------- streaming
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
            "--max-steps", "8", "--checkpoint-every", "4", "--gps-noise-km", "50", "--augmentation", "map",
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
    # 96 rows = 12 micro-batches of 8 = 6 steps per epoch: step 4 is 8 micro-batches into the first epoch
    position = pathlib.Path(stopped, "checkpoints", "step_00000004", "stream_position_0.json").read_text()
    assert json.loads(position) == {"epoch": 0, "batches": 8}
    assert main([*args, "--output-dir", stopped, "--resume"]) == 0
    assert main([*args, "--output-dir", reference]) == 0
    assert_same_weights(stopped, reference)
    summary = json.loads(pathlib.Path(reference, "train_summary.json").read_text())
    assert summary["train_rows"] == 96 and summary["samples_per_process"] == [8 * 16]
    assert AutoModel.from_pretrained(reference).config.gallery_size == 96


def test_geohier_streams_an_image_folder(worldmap, tmp_path):
    out = str(tmp_path / "geohier")
    assert main(["--model", "geohier", "--dataset", worldmap, "--streaming", "--output-dir", out, "--max-steps",
                 "4", "--checkpoint-every", "100", "--geocell-levels", "2:40,2:20,2:10", *TINY]) == 0
    assert AutoModel.from_pretrained(out).config.has_cell_table
