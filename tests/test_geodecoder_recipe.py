"""The `geodecoder-paper` recipe is GeoGuessNet's `main.py` path (AHKerrigan/GeoGuessNet at b249832): its loss,
gradients, partitions and scene labels, and nothing from its `lit.py` variant."""

import csv
import os

import datasets
import numpy as np
import pytest
import torch

from geoloc.geography.geocells import build_geocells, load_cell_table, save_cell_table
from geoloc.geography.geocells import main as geocells_main
from geoloc.training.train import build_parser, resolve_args
from geoloc.training.tasks import IMAGENET_MEAN, GeoHierTask

PARTITIONS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "geoestimation-partitions")
PARTITION_FILES = [os.path.join(PARTITIONS, f"cells_50_{tau}.csv") for tau in (5000, 2000, 1000)]


def recipe_task(tmp_path, *extra, scenes=True):
    """`GeoHierTask` built as `geoloc train --recipe geodecoder-paper --model-config tiny` builds it, on a small cell
    table of 40 random points (with scene labels 0..3 unless `scenes=False`)."""
    rng = np.random.default_rng(0)
    latitudes, longitudes = rng.uniform(-60, 60, 40), rng.uniform(-180, 180, 40)
    cells, _ = build_geocells(latitudes, longitudes, levels=[(1, 20), (1, 10), (1, 5)], min_level=0)
    save_cell_table(cells, tmp_path / "cells.json")
    args = resolve_args(build_parser().parse_args([
        "--recipe", "geodecoder-paper", "--model-config", "tiny", "--dataset", "d", "--output-dir", "o",
        "--geocells", str(tmp_path / "cells.json"), *extra]))
    columns = {"latitude": latitudes, "longitude": longitudes}
    if scenes:
        columns["scene"] = rng.integers(0, 4, 40)
    dataset = datasets.Dataset.from_dict(columns)
    task = GeoHierTask(args, accelerator=None)
    task.build(dataset, latitudes, longitudes)
    return task, dataset


def test_recipe_loss_and_gradients_are_geoguessnets(tmp_path):
    task, dataset = recipe_task(tmp_path)
    model = task.model.eval()  # no dropout: both sides see the same logits
    config = model.config
    assert (config.loss_weights, config.label_smoothing, config.scene_label_smoothing) == ((1.0, 1.0, 1.0), 0.1, 0.1)
    assert task.args.loss_scale == 2.0 and tuple(task.image_processor.image_mean) == IMAGENET_MEAN
    batch = {"pixel_values": torch.randn(8, 3, 32, 32), "labels": torch.as_tensor(task.labels[:8]),
             "scene_labels": torch.as_tensor(dataset["scene"][:8])}
    assert (batch["labels"] >= 0).all()

    loss = task.loss(model, batch)  # what `geoloc train` runs: one step of the global batch of 8
    loss.backward()
    ours = {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}
    model.zero_grad()

    # GeoGuessNet main.py + train_and_eval.py train_images, written out: one criterion for every head, equal
    # weights, the scene loss added, and 2 accumulated micro-batches whose losses are not divided.
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    source_loss = 0.0
    for half in (slice(0, 4), slice(4, 8)):
        output = model(pixel_values=batch["pixel_values"][half])
        outs1, outs2, outs3 = output.logits
        labels = batch["labels"][half]
        micro = criterion(outs1, labels[:, 0]) + criterion(outs2, labels[:, 1]) + criterion(outs3, labels[:, 2])
        micro = micro + criterion(output.scene_logits, batch["scene_labels"][half])
        micro.backward()
        source_loss += micro.item()
    assert loss.item() == pytest.approx(source_loss, rel=1e-5)
    assert ours.keys() == {name for name, parameter in model.named_parameters() if parameter.grad is not None}
    for name, gradient in ours.items():
        torch.testing.assert_close(gradient, model.get_parameter(name).grad, rtol=1e-4, atol=1e-6, msg=name)


def test_loss_on_given_logits_matches_the_source_formula(tmp_path):
    task, _ = recipe_task(tmp_path)
    model, generator = task.model, torch.Generator().manual_seed(1)
    logits = tuple(torch.randn(6, n, generator=generator, requires_grad=True) for n in model.config.cells_per_level)
    scene_logits = torch.randn(6, model.config.num_scenes, generator=generator, requires_grad=True)
    labels = torch.stack([torch.randint(0, n, (6,), generator=generator) for n in model.config.cells_per_level], 1)
    scenes = torch.randint(0, model.config.num_scenes, (6,), generator=generator)
    ours = model.loss_from_logits(logits, labels, scene_logits, scenes) * task.args.loss_scale
    ours_grads = torch.autograd.grad(ours, (*logits, scene_logits))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    levels = sum(criterion(level, labels[:, i]) for i, level in enumerate(logits))
    source = 2 * (levels + criterion(scene_logits, scenes))
    for mine, theirs in zip(ours_grads, torch.autograd.grad(source, (*logits, scene_logits))):
        torch.testing.assert_close(mine, theirs)
    assert ours.item() == pytest.approx(source.item(), rel=1e-6)


def test_recipe_refuses_without_partitions_or_scene_labels(tmp_path):
    with pytest.raises(ValueError, match="geoloc geocells import cells_50_5000.csv"):
        resolve_args(build_parser().parse_args(["--recipe", "geodecoder-paper", "--dataset", "d", "--output-dir", "o"]))
    with pytest.raises(ValueError, match="--no-scenes"):
        recipe_task(tmp_path, scenes=False)
    task, _ = recipe_task(tmp_path, "--no-scenes")
    assert task.scene_column is None and not task.model.config.trained_with_scene_labels


def test_imported_geoestimation_partitions_keep_class_ids_and_means(tmp_path):
    if not all(os.path.isfile(path) for path in PARTITION_FILES):
        pytest.skip(f"the published GeoEstimation partitions are not in {PARTITIONS} (../shared of the checkout)")
    output = tmp_path / "mp16-cells.json"
    assert geocells_main(["import", *PARTITION_FILES, "--output", str(output)]) == 0
    cells = load_cell_table(output)
    assert [len(level["tokens"]) for level in cells] == [3298, 7202, 12893]
    for level, path in zip(cells, PARTITION_FILES):
        with open(path, newline="") as handle:
            rows = sorted(csv.DictReader(handle.read().splitlines()[2:]), key=lambda row: int(row["class_label"]))
        assert list(level["tokens"]) == [row["hex_id"] for row in rows]  # row i is class_label i
        np.testing.assert_allclose(level["latitudes"], [float(row["latitude_mean"]) for row in rows], atol=1e-9)
        np.testing.assert_allclose(level["longitudes"], [float(row["longitude_mean"]) for row in rows], atol=1e-9)
    assert all((level["parents"] >= 0).all() for level in cells[1:])


def test_recipe_trains_end_to_end_and_saves_its_evaluation_transform(tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor

    from geoloc.training.train import main

    rng = np.random.default_rng(0)
    latitudes, longitudes = rng.uniform(-60, 60, 16), rng.uniform(-180, 180, 16)
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(16):  # 4:3 photos
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    (folder / "metadata.csv").write_text("file_name,latitude,longitude,S16_Label\n" + "".join(
        f"{index}.png,{lat},{lon},{index % 4}\n" for index, (lat, lon) in enumerate(zip(latitudes, longitudes))))
    cells, _ = build_geocells(latitudes, longitudes, levels=[(1, 8), (1, 4), (1, 2)], min_level=0)
    save_cell_table(cells, tmp_path / "cells.json")
    out = tmp_path / "run"
    assert main(["--recipe", "geodecoder-paper", "--model-config", "tiny", "--dataset", str(folder),
                 "--geocells", str(tmp_path / "cells.json"), "--scene-column", "S16_Label", "--output-dir", str(out),
                 "--max-steps", "2", "--batch-size", "8", "--checkpoint-every", "100"]) == 0
    processor = AutoImageProcessor.from_pretrained(out)
    assert processor.size == {"shortest_edge": 37} and processor.crop_size == {"height": 32, "width": 32}
    assert tuple(processor.image_mean) == IMAGENET_MEAN
    assert processor(Image.new("RGB", (40, 30)), return_tensors="pt").pixel_values.shape == (1, 3, 32, 32)
