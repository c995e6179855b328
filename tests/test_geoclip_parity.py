"""Parity of the converted GeoCLIP with the official code of the PyPI wheel `geoclip==1.3.0`.

The wheel is read from the cache `official_geoclip.DEFAULT_CACHE` (tests/official_geoclip.py) (`~/.cache/geoloc/wheels`), where
`.ci/run` puts it before the tests (`python tests/official_geoclip.py`, a `pip download --no-deps` from PyPI);
the tests never download it and are skipped, saying how to fetch it, when it is absent. Its code is imported
from the unpacked wheel without installing anything. The CLIP backbone is a tiny random one with CLIP-L's
768-d projection: the converted parts (GPS encoder, image MLP, logit scale, gallery) do not depend on it.
"""

import copy
import json
import time
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModel

from geoloc import cli
from geoloc.configs import tiny_clip_configs
from geoloc.hub.convert import convert_geoclip, main, read_official_geoclip
from official_geoclip import DEFAULT_CACHE, cached_official_wheel, load_official_geoclip
from modeling_geoclip import GeoCLIPLocationEncoder, GeoCLIPModel
from geoloc.models import register_models

register_models()  # the Auto classes below read GeoCLIP and GeoHier checkpoints

TOLERANCE = 1e-5
# Poles, the antimeridian from both sides, their corners, the origin.
EDGE_POINTS = [[90, 0], [-90, 0], [90, 180], [-90, -180], [90, -180], [-90, 180], [0, 180], [0, -180],
               [45, 180], [-45, -180], [89.999999, 179.999999], [-89.999999, -179.999999], [0, 0]]


@pytest.fixture(scope="module")
def wheel():
    cached = cached_official_wheel()
    if cached is None:
        pytest.skip(f"the official geoclip==1.3.0 wheel is not in {DEFAULT_CACHE}: fetch it with "
                    "`python tests/official_geoclip.py` (`.ci/run` does)")
    return cached


class _IdentityCLIP(nn.Module):
    """Stands in for the official image encoder's CLIPModel: its 'pixel values' are CLIP image features."""

    def __init__(self, config):
        super().__init__()

    def get_image_features(self, pixel_values):
        return pixel_values


@pytest.fixture(scope="module")
def official(wheel):
    """The official code, and its GeoCLIP (released weights) fed with CLIP features instead of images."""
    code = load_official_geoclip(wheel)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(code.image_encoder_module, "CLIPModel", _IdentityCLIP)
        code.model = code.GeoCLIP(from_pretrained=True, clip_pretrained=False).eval()
    return code


def _random_backbone_config():
    vision, text = tiny_clip_configs()
    vision.projection_dim = text.projection_dim = 768  # the official MLP's input width
    return vision, text


@pytest.fixture(scope="module")
def converted(wheel, tmp_path_factory):
    """The wheel converted to a full GeoCLIPModel (100K gallery encoded once) and reloaded from disk."""
    folder = tmp_path_factory.mktemp("geoclip-converted")
    convert_geoclip(wheel, folder, random_backbone=True, backbone_config=_random_backbone_config())
    return AutoModel.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def location_encoder(wheel, tmp_path_factory):
    folder = tmp_path_factory.mktemp("geoclip-location-encoder")
    assert main([str(wheel), str(folder), "--location-encoder-only"]) == 0
    return AutoModel.from_pretrained(folder).eval()


def _test_points(gallery: torch.Tensor, n_gallery: int, n_uniform: int) -> torch.Tensor:
    """Random gallery rows, uniform random points and `EDGE_POINTS`, as a (N, 2) float32 tensor."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randperm(len(gallery), generator=generator)[:n_gallery]
    uniform = torch.rand(n_uniform, 2, generator=generator) * torch.tensor([180.0, 360.0]) - torch.tensor([90.0, 180.0])
    return torch.cat([gallery[rows], uniform, torch.tensor(EDGE_POINTS, dtype=torch.float32)])


def test_location_embeddings_match_official(official, location_encoder):
    # Gallery rows are compared in bulk by test_converted_gallery_matches_official.
    assert isinstance(location_encoder, GeoCLIPLocationEncoder)
    points = _test_points(official.model.gps_gallery, n_gallery=1_000, n_uniform=4_000)
    with torch.no_grad():
        ours, reference = location_encoder(points), official.model.location_encoder(points)
    assert ours.shape == (len(points), 512)
    assert (ours - reference).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_location_embeddings_are_fp32_under_autocast_and_half_casts(official, location_encoder, dtype):
    """Mixed precision (what `geoloc train --mixed-precision` turns on) and `model.to(half)` leave the official
    encoder's embeddings equal to fp32: the sigma=256 Fourier phases (~1e3 rad) would be noise in bf16/fp16."""
    points = _test_points(official.model.gps_gallery, n_gallery=1_000, n_uniform=1_000)
    with torch.no_grad():
        reference = location_encoder(points)
        with torch.autocast("cpu", dtype=dtype):
            autocast = location_encoder(points)
        half = copy.deepcopy(location_encoder).to(dtype)(points)
    for embeddings in (autocast, half):
        assert embeddings.dtype == torch.float32
        torch.testing.assert_close(embeddings, reference, rtol=0, atol=0)


def test_converted_gallery_matches_official(official, converted):
    assert isinstance(converted, GeoCLIPModel)
    reference_gallery = official.model.gps_gallery  # float32, as the official code reads the CSV
    assert converted.config.gallery_size == len(reference_gallery) == 100_000
    csv = pd.read_csv(official.root / "gps_gallery" / "coordinates_100K.csv")
    np.testing.assert_array_equal(converted.gallery_locations.numpy(), csv[["LAT", "LON"]].to_numpy())
    rows = torch.randperm(len(reference_gallery), generator=torch.Generator().manual_seed(1))[:20_000]
    with torch.no_grad():
        reference = F.normalize(official.model.location_encoder(reference_gallery[rows]), dim=1)
    assert (converted.gallery.embeddings[rows] - reference).abs().max().item() <= TOLERANCE
    assert converted.logit_scale.item() == official.model.logit_scale.item()


def test_logits_and_predictions_match_official(official, converted):
    features = torch.randn(8, 768)
    locations = _test_points(official.model.gps_gallery, n_gallery=1_500, n_uniform=500)
    with torch.no_grad():
        reference = official.model(features, locations)  # the official forward, on CLIP features
        ours = converted(clip_image_embeds=features, locations=locations).logits_per_image
    assert ours.shape == reference.shape == (8, len(locations))
    assert (ours - reference).abs().max().item() <= TOLERANCE

    # geolocate == the official predict's softmax + top-k, over a gallery of these locations.
    model = copy.deepcopy(converted)
    model.set_gallery(locations)
    prediction = model.geolocate(clip_image_embeds=features, top_k=5)
    top = reference.softmax(dim=-1).topk(5, dim=1)
    assert torch.equal(prediction.indices, top.indices)
    assert (prediction.probabilities - top.values).abs().max().item() <= TOLERANCE
    expected = model.gallery_locations[top.indices]
    assert torch.equal(prediction.latitudes, expected[..., 0]) and torch.equal(prediction.longitudes, expected[..., 1])


# ----------------------------------------------------------------------------------- Hub release folders
def _release(folder, weights, gallery=None, **config):
    folder.mkdir()
    config = {"format_version": 1, "sigma": [1, 16, 256], **config}
    if gallery is not None:
        pd.DataFrame(gallery.numpy(), columns=["LAT", "LON"]).to_csv(folder / "gallery.csv", index=False)
        config.update(model_type="geoclip-geolocation", gallery_file="gallery.csv",
                      backbone={"repo_id": "openai/clip-vit-large-patch14", "revision": "main"})
    else:
        config.setdefault("model_type", "geoclip-location-encoder")
    (folder / "config.json").write_text(json.dumps(config))
    save_file({key: value.contiguous() for key, value in weights.items()}, folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def wheel_weights(wheel):
    return read_official_geoclip(wheel)[0]


def test_unpacked_wheel_folders_read_like_the_wheel(official, wheel_weights):
    for folder in (official.root.parent.parent, official.root):  # the unpacked wheel, its geoclip/model
        weights, metadata = read_official_geoclip(folder)
        assert weights.keys() == wheel_weights.keys()
        assert all(torch.equal(weights[key], wheel_weights[key]) for key in weights)
        assert metadata["gallery"].shape == (100_000, 2) and metadata["sigmas"] == [1.0, 16.0, 256.0]


def test_geolocation_release_folder(official, converted, wheel_weights, tmp_path):
    gallery = official.model.gps_gallery[:50]
    release = _release(tmp_path / "release", wheel_weights, gallery)
    # The folder is a valid official release: the official loader reads it.
    _, config, weights = official.hub.read_release(release, "geoclip-geolocation")
    official.hub.load_geoclip_weights(official.model, weights)
    assert torch.equal(official.hub.read_gallery(release, config), gallery)

    model = convert_geoclip(release, tmp_path / "out", random_backbone=True, backbone_config=_random_backbone_config())
    reference = converted.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith(("location_encoder.", "image_mlp.", "logit_scale")):
            assert torch.equal(value, reference[key]), key
    assert torch.allclose(model.gallery_locations, gallery.double(), atol=1e-6)
    with torch.no_grad():
        reference_embeddings = F.normalize(official.model.location_encoder(gallery), dim=1)
    assert (model.gallery.embeddings - reference_embeddings).abs().max().item() <= TOLERANCE


def test_location_encoder_release_folder(official, location_encoder, wheel_weights, tmp_path):
    encoder_weights = {key.removeprefix("location_encoder."): value for key, value in wheel_weights.items()
                       if key.startswith("location_encoder.")}
    release = _release(tmp_path / "release", encoder_weights)
    reference = official.LocationEncoder.from_pretrained(release)
    ours = convert_geoclip(release, tmp_path / "out", location_encoder_only=True)
    points = torch.tensor(EDGE_POINTS, dtype=torch.float32)
    with torch.no_grad():
        assert (ours(points) - reference(points)).abs().max().item() <= TOLERANCE
        assert torch.equal(ours(points), location_encoder(points))
    with pytest.raises(ValueError, match="location_encoder_only=True"):
        convert_geoclip(release, tmp_path / "full", random_backbone=True, backbone_config=_random_backbone_config())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda w: w.pop("location_encoder.LocEnc1.head.0.bias"), r"missing .*capsules\.1\.head\.bias"),
        (lambda w: w.update(extra=torch.zeros(1)), r"unexpected .*'extra'"),
        (lambda w: w.update({"location_encoder.LocEnc3.capsule.0.b": torch.zeros(256, 2)}), r"unexpected .*LocEnc3"),
        (lambda w: w.update({"image_encoder.mlp.2.weight": torch.zeros(256, 768)}),
         r"wrong shapes .*image_mlp\.2\.weight: \(256, 768\) != \(512, 768\)"),
    ],
)
def test_bad_release_weights_raise(official, wheel_weights, tmp_path, edit, message):
    weights = dict(wheel_weights)
    edit(weights)
    release = _release(tmp_path / "release", weights, official.model.gps_gallery[:5])
    with pytest.raises(ValueError, match=message):
        convert_geoclip(release, tmp_path / "out", random_backbone=True, backbone_config=_random_backbone_config())


@pytest.mark.parametrize(
    "config, message",
    [
        ({"format_version": 2}, "format_version 1"),
        ({"format_version": True}, "format_version 1"),
        ({"model_type": "clip"}, "model_type"),
        ({"sigma": [1, -16]}, "sigma must be a list of positive numbers"),
    ],
)
def test_bad_release_config_raises(wheel_weights, tmp_path, config, message):
    encoder_weights = {key.removeprefix("location_encoder."): value for key, value in wheel_weights.items()
                       if key.startswith("location_encoder.")}
    release = _release(tmp_path / "release", encoder_weights, **config)
    with pytest.raises(ValueError, match=message):
        convert_geoclip(release, tmp_path / "out", location_encoder_only=True)


def test_convert_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "--help"])
    assert exit_info.value.code == 0
    assert "--location-encoder-only" in capsys.readouterr().out
    assert cli.main(["convert", str(tmp_path / "missing.whl"), str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("geoloc convert: error: ") and error.count("\n") == 1 and "missing.whl does not" in error
    with zipfile.ZipFile(tmp_path / "other.whl", "w") as archive:
        archive.writestr("other/__init__.py", "")
    assert cli.main(["convert", str(tmp_path / "other.whl"), str(tmp_path / "out")]) == 1
    assert "not a GeoCLIP wheel: geoclip/model/weights/" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a wheel")
    assert cli.main(["convert", str(tmp_path / "notes.txt"), str(tmp_path / "out"), "--location-encoder-only"]) == 1
    assert "not a wheel" in capsys.readouterr().err


def test_convert_without_network_fails_at_once_saying_what_to_do(wheel, tmp_path, capsys, monkeypatch):
    """The Hub endpoint is a closed port on this machine: `geoloc convert` notices in a moment and runs offline
    (the backbone is not cached, so it stops) instead of retrying for ~30 s."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    started = time.perf_counter()
    assert cli.main(["convert", str(wheel), str(tmp_path / "out"), "--backbone", "someone/clip-not-cached"]) == 1
    assert time.perf_counter() - started < 20
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("geoloc convert: error: ") and "find them in the cached files" in line
    assert "http://127.0.0.1:9 is unreachable" in line and "HF_HUB_OFFLINE=1" in line


# ------------------------------------------------------------------------------------------- training parity
TRAIN_BATCH, TRAIN_QUEUE, STEPS_PER_EPOCH = 8, 32, 3
LEARNING_RATE = "1e-3"  # the paper's 3e-5 would move the weights too little to show a wrong gradient


def _grid_points(generator, count):
    """Random (lat, lon) on a 1/64-degree grid: exact in float32, float64 and int32 micro-degrees alike, so the
    official float32 queue and our micro-degree queue hold the same numbers."""
    latitudes = torch.randint(-80 * 64, 80 * 64, (count,), generator=generator) / 64
    longitudes = torch.randint(-180 * 64, 180 * 64, (count,), generator=generator) / 64
    return torch.stack([latitudes, longitudes], dim=1).double()


def _training_checkpoint(wheel, folder, queue):
    """The released GeoCLIP weights on a tiny random CLIP tower (768-d projection), with `queue` already in its
    GPS queue, saved as `geoloc train --model-config` reads it."""
    from geoloc.configs import byte_level_clip_tokenizer, tiny_image_processor
    from geoloc.hub.convert import load_official_weights, read_official_geoclip
    from modeling_geoclip import GeoCLIPConfig, GeoCLIPLocationEncoderConfig

    weights, metadata = read_official_geoclip(wheel)
    vision, text = _random_backbone_config()
    config = GeoCLIPConfig(vision_config=vision, text_config=text, queue_size=len(queue), backbone="random",
                           location_config=GeoCLIPLocationEncoderConfig(sigmas=metadata["sigmas"]))
    model = GeoCLIPModel(config)
    load_official_weights(model, weights)
    model.enqueue_locations(queue)
    model.set_gallery(queue[:4])
    model.save_pretrained(folder)
    tiny_image_processor("geoclip").save_pretrained(folder)
    byte_level_clip_tokenizer().save_pretrained(folder)
    return model


def _image_folder(folder, locations, generator):
    import csv

    from PIL import Image

    folder.mkdir()
    with open(folder / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "latitude", "longitude"])
        for index, (latitude, longitude) in enumerate(locations.tolist()):
            pixels = torch.randint(0, 256, (40, 48, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{index:03d}.png")
            writer.writerow([f"{index:03d}.png", repr(latitude), repr(longitude)])


def test_training_steps_match_the_official_trainer(wheel, tmp_path, monkeypatch):
    """`geoloc train --recipe geoclip-paper` (the code path the CLI runs) and the official loop
    (`geoclip/train/train.py` with the official `GeoCLIP`, its `get_gps_queue` and `dequeue_and_enqueue`), fed the
    same batches from the same start, take the same 6 optimizer steps over 2 epochs: losses, weights, temperature
    and queue agree within 1e-5.

    The paper's optimiser (Adam, weight decay 1e-6, the rate times 0.87 after each epoch, no clipping) at a rate of
    1e-3 instead of 3e-5, so that a wrong gradient moves the weights visibly. Intended differences, put in the same
    state here: the official queue starts full of random unit vectors (ours empty, used as it fills), so both start
    from the same full queue; the official code has no GPS noise (the recipe's 150 m / 1 km are turned off) and
    its transforms are torchvision's random ones (augmentation off). The official image encoder gets the CLIP
    features of our frozen tiny tower, which is what a frozen CLIP tower gives it."""
    from geoloc.training import tasks as training_tasks
    from geoloc.training.train import main as train_main

    generator = torch.Generator().manual_seed(0)
    queue = _grid_points(generator, TRAIN_QUEUE)
    data, checkpoint, output = tmp_path / "data", tmp_path / "start", tmp_path / "trained"
    _image_folder(data, _grid_points(generator, TRAIN_BATCH * STEPS_PER_EPOCH), generator)
    start = _training_checkpoint(wheel, checkpoint, queue).eval()

    batches, start_step = [], training_tasks.GeoCLIPTask.start_step

    def recording_start_step(self, step_batches, weights):
        batches.extend((batch["pixel_values"].clone(), batch["locations"].clone()) for batch in step_batches)
        return start_step(self, step_batches, weights)

    monkeypatch.setattr(training_tasks.GeoCLIPTask, "start_step", recording_start_step)
    assert train_main([
        "--recipe", "geoclip-paper", "--model-config", str(checkpoint), "--dataset", str(data),
        "--output-dir", str(output), "--batch-size", str(TRAIN_BATCH), "--max-steps", str(2 * STEPS_PER_EPOCH),
        "--learning-rate", LEARNING_RATE, "--augmentation", "none", "--gps-noise-km", "0", "--queue-noise-km", "0",
        "--log-every", "1", "--checkpoint-every", "100"]) == 0
    ours = AutoModel.from_pretrained(output)
    our_losses = [json.loads(line)["loss"] for line in open(output / "log.jsonl")]

    code = load_official_geoclip(wheel)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(code.image_encoder_module, "CLIPModel", _IdentityCLIP)
        reference = code.GeoCLIP(from_pretrained=True, queue_size=TRAIN_QUEUE, clip_pretrained=False)
    reference.gps_queue.copy_(queue.float().T)
    optimizer = torch.optim.Adam(reference.parameters(), lr=float(LEARNING_RATE), weight_decay=1e-6)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.87)
    official_losses = []

    def criterion(logits, targets):
        loss = F.cross_entropy(logits, targets)
        official_losses.append(loss.item())
        return loss

    with torch.no_grad():
        official_batches = [(start.get_clip_image_embeds(pixels), locations.float()) for pixels, locations in batches]
    for epoch in range(2):
        epoch_batches = official_batches[epoch * STEPS_PER_EPOCH:(epoch + 1) * STEPS_PER_EPOCH]
        code.train(epoch_batches, reference, optimizer, epoch, TRAIN_BATCH, "cpu", scheduler, criterion)

    assert len(batches) == 6 and len(our_losses) == 6
    assert our_losses == pytest.approx(official_losses, abs=TOLERANCE, rel=0)
    released = {key: value for key, value in reference.state_dict().items()
                if key.startswith(("location_encoder.", "image_encoder.mlp.", "logit_scale"))}
    trained = ours.state_dict()
    from geoloc.hub.convert import convert_official_state_dict

    expected = convert_official_state_dict(released, {key: trained[key] for key in trained
                                                      if key.startswith(("location_encoder.", "image_mlp.", "logit_scale"))})
    moved = 0.0
    for key, value in expected.items():
        torch.testing.assert_close(trained[key], value, atol=TOLERANCE, rtol=0, msg=key)
        moved = max(moved, (trained[key] - start.state_dict()[key]).abs().max().item())
    assert moved > 100 * TOLERANCE  # the comparison is not of two untrained models
    torch.testing.assert_close(ours.gps_queue.float(), reference.gps_queue.T, atol=0, rtol=0)
    assert int(ours.gps_queue_ptr) == int(reference.gps_queue_ptr) == (6 * TRAIN_BATCH) % TRAIN_QUEUE
