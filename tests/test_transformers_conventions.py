"""What a transformers user does with any model works with both of ours: `from_pretrained(..., dtype=torch.bfloat16,
device_map="cpu")` answers (GeoCLIP's location encoder stays fp32, bit for bit), `gradient_checkpointing_enable()`
gives the gradients of a run without it, and `save_pretrained` / `from_pretrained` round trips are exact."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModel

from conftest import save_tiny_geoclip
from geoloc.configs import TINY_IMAGE_SIZE, tiny_geoclip_config, tiny_geohier_config
from geoloc.models import register_models
from modeling_geoclip import GeoCLIPModel
from modeling_geohier import GeoHierModel
from tests.test_geohier import synthetic_cells

GALLERY = np.random.default_rng(0).uniform([-90, -180], [90, 180], size=(20, 2))
LOCATIONS = torch.tensor([[48.85, 2.35], [-33.87, 151.21], [40.71, -74.0], [-1.29, 36.82]])


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_models()


def _pixels(batch=4, seed=0):
    return torch.randn(batch, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def _geohier(folder=None):
    torch.manual_seed(0)
    model = GeoHierModel(tiny_geohier_config()).eval()
    model.set_cell_table(synthetic_cells())
    if folder is not None:
        model.save_pretrained(folder)
    return model


def test_geoclip_loads_in_bf16_with_an_fp32_location_encoder(tmp_path):
    model = save_tiny_geoclip(tmp_path, GALLERY)
    half = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cpu").eval()
    assert half.image_mlp[0].weight.dtype == torch.bfloat16
    encoder = dict(half.location_encoder.state_dict())
    assert {tensor.dtype for tensor in encoder.values()} == {torch.float32}
    for name, tensor in model.location_encoder.state_dict().items():
        assert torch.equal(encoder[name], tensor), name
    # What failed with "expected m1 and m2 to have the same dtype": encoding locations, a new gallery, training.
    assert torch.equal(half.get_location_features(LOCATIONS), model.get_location_features(LOCATIONS))
    half.set_gallery(GALLERY[:10])
    answer = half.geolocate(pixel_values=_pixels(2), top_k=3)
    assert answer.latitudes.shape == (2, 3) and torch.isfinite(answer.probabilities).all()
    loss = half.train()(pixel_values=_pixels(4), locations=LOCATIONS, return_loss=True).loss
    loss.backward()
    assert torch.isfinite(loss) and half.image_mlp[0].weight.grad is not None


def test_geohier_loads_in_bf16(tmp_path):
    model = _geohier(tmp_path)
    half = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cpu").eval()
    assert half.queries.dtype == torch.bfloat16
    answer = half.geolocate(pixel_values=_pixels(2), top_k=3)
    assert answer.latitudes.shape == (2, 3) and torch.isfinite(answer.probabilities).all()
    # bf16 changes the scores, never the stored centroids the answers are read from (integer micro-degrees)
    centroids = torch.tensor(model.get_cell_table()[-1]["latitudes"])
    torch.testing.assert_close(answer.latitudes, centroids[answer.indices].to(answer.latitudes.dtype), atol=1e-6,
                               rtol=0)


def _gradients(model, loss_of) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss_of(model).backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


def _check_checkpointing(model, loss_of, checkpointed_names):
    model.train()
    plain = _gradients(model, loss_of)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    for name in checkpointed_names:
        assert model.get_submodule(name).gradient_checkpointing, name
    checkpointed = _gradients(model, loss_of)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient, rtol=1e-6, atol=1e-7, msg=name)


def test_geoclip_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GeoCLIPModel(tiny_geoclip_config(freeze_backbone=False))
    pixels = _pixels(4)

    def loss_of(model):
        return model(pixel_values=pixels, locations=LOCATIONS, return_loss=True).loss

    _check_checkpointing(model, loss_of, ["image_tower.vision_model.encoder.layers.0"])


def test_geohier_gradient_checkpointing_gives_the_same_gradients():
    model = _geohier()
    pixels, labels = _pixels(4), torch.tensor([[0, 1, 2], [3, 4, 5], [7, 15, 31], [1, 2, 4]])

    def loss_of(model):
        torch.manual_seed(1)  # dropout: the same draws in both runs (checkpointing replays them)
        return model(pixel_values=pixels, labels=labels, scene_labels=torch.tensor([0, 1, -1, 3])).loss

    _check_checkpointing(model, loss_of, ["independent_layers.0", "dependent_layers.0",
                                          "backbone.encoder.layers.0"])


def _config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def _without_dtype(settings):
    if isinstance(settings, dict):
        return {key: _without_dtype(value) for key, value in settings.items() if key != "dtype"}
    return settings


@pytest.mark.parametrize("kind", ["geoclip", "geohier"])
def test_save_and_load_round_trips_are_exact(kind, tmp_path):
    model = save_tiny_geoclip(tmp_path / "a", GALLERY) if kind == "geoclip" else _geohier(tmp_path / "a")
    loaded = AutoModel.from_pretrained(tmp_path / "a").eval()
    loaded.save_pretrained(tmp_path / "b")
    again = AutoModel.from_pretrained(tmp_path / "b").eval()
    # The config survives too; transformers only writes the loaded dtype ("float32") into each sub-config.
    assert _without_dtype(_config(tmp_path / "a")) == _without_dtype(_config(tmp_path / "b"))
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == again.state_dict()[name].dtype and torch.equal(again.state_dict()[name], tensor), name
    pixels = _pixels(2)
    expected, actual = model.geolocate(pixel_values=pixels, top_k=3), again.geolocate(pixel_values=pixels, top_k=3)
    for field in ("latitudes", "longitudes", "probabilities", "indices"):
        assert torch.equal(getattr(actual, field), getattr(expected, field)), field
