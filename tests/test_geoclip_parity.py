"""Parity of the converted GeoCLIP with the official code of the PyPI wheel `geoclip==1.3.0`.

The wheel is read from the cache `geoloc.official_geoclip.DEFAULT_CACHE` (`~/.cache/geoloc/wheels`), where
`.ci/run` puts it before the tests (`python -m geoloc.official_geoclip`, a `pip download --no-deps` from PyPI);
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
from geoloc.convert import convert_geoclip, main, read_official_geoclip
from geoloc.official_geoclip import DEFAULT_CACHE, cached_official_wheel, load_official_geoclip
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
                    "`python -m geoloc.official_geoclip` (`.ci/run` does)")
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
    assert (converted.gallery_embeddings[rows] - reference).abs().max().item() <= TOLERANCE
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
    assert (model.gallery_embeddings - reference_embeddings).abs().max().item() <= TOLERANCE


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
