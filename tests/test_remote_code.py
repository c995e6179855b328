"""The modeling folders must work as Hub remote code: saved with `register_for_auto_class`, a checkpoint
loads with `trust_remote_code=True` from the copied module files alone, without this package."""

import json
import subprocess
import sys

import pytest
import torch

from geoloc.configs import tiny_geoclip_config, tiny_geohier_config
from modeling_geoclip import GeoCLIPConfig, GeoCLIPModel
from modeling_geohier import GeoHierConfig, GeoHierModel
from tests.test_geohier import synthetic_cells

LOAD_AND_PREDICT = """
import sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert not {"modeling_geoclip", "modeling_geohier", "geoloc"} & set(sys.modules), "the package was imported"
print(type(model).__module__)
torch.manual_seed(1)
print(model.geolocate(pixel_values=torch.randn(2, 3, 32, 32), top_k=2).probabilities.tolist())
"""


def _geoclip():
    model = GeoCLIPModel(tiny_geoclip_config())
    model.set_gallery([[0.0, 0.0], [10.0, 10.0], [-20.0, 170.0]])
    return model


def _geohier():
    model = GeoHierModel(tiny_geohier_config())
    model.set_cell_table(synthetic_cells())
    return model


@pytest.mark.parametrize(
    "build, config_class, model_class, module",
    [(_geoclip, GeoCLIPConfig, GeoCLIPModel, "geoclip"), (_geohier, GeoHierConfig, GeoHierModel, "geohier")],
)
def test_model_loads_as_remote_code(build, config_class, model_class, module, tmp_path, monkeypatch):
    model = build().eval()
    # register_for_auto_class sets class attributes: undo them after the test.
    monkeypatch.setattr(config_class, "_auto_class", None)
    monkeypatch.setattr(model_class, "_auto_class", None)
    config_class.register_for_auto_class()
    model_class.register_for_auto_class("AutoModel")
    model.save_pretrained(tmp_path)
    assert {f"configuration_{module}.py", f"modeling_{module}.py"} <= {p.name for p in tmp_path.iterdir()}
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == f"modeling_{module}.{model_class.__name__}"

    # Run from tmp with a bare environment so that only the copied module files can be used.
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded_module, probabilities = result.stdout.strip().splitlines()[-2:]
    assert loaded_module.startswith("transformers_modules.")
    torch.manual_seed(1)
    expected = model.geolocate(pixel_values=torch.randn(2, 3, 32, 32), top_k=2).probabilities
    torch.testing.assert_close(torch.tensor(json.loads(probabilities)), expected)
