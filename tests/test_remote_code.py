"""The modeling folders must work as Hub remote code: saved with `register_for_auto_class`, a checkpoint
loads with `trust_remote_code=True` from the copied module files alone, without this package."""

import json
import subprocess
import sys

import torch

from geoloc.configs import tiny_geoclip_config
from modeling_geoclip import GeoCLIPConfig, GeoCLIPModel

LOAD_AND_PREDICT = """
import sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert "modeling_geoclip" not in sys.modules and "geoloc" not in sys.modules, "package was imported"
print(type(model).__module__)
torch.manual_seed(1)
out = model.geolocate(pixel_values=torch.randn(2, 3, 32, 32), top_k=2)
print(out.probabilities.tolist())
"""


def test_geoclip_loads_as_remote_code(tmp_path, monkeypatch):
    model = GeoCLIPModel(tiny_geoclip_config()).eval()
    model.set_gallery([[0.0, 0.0], [10.0, 10.0], [-20.0, 170.0]])
    # register_for_auto_class sets class attributes: undo them after the test.
    monkeypatch.setattr(GeoCLIPConfig, "_auto_class", None)
    monkeypatch.setattr(GeoCLIPModel, "_auto_class", None)
    GeoCLIPConfig.register_for_auto_class()
    GeoCLIPModel.register_for_auto_class("AutoModel")
    model.save_pretrained(tmp_path)
    assert {"configuration_geoclip.py", "modeling_geoclip.py"} <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_geoclip.GeoCLIPModel"

    # Run from tmp with a bare environment so that only the copied module files can be used.
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    module, probabilities = result.stdout.strip().splitlines()[-2:]
    assert module.startswith("transformers_modules.")
    torch.manual_seed(1)
    expected = model.geolocate(pixel_values=torch.randn(2, 3, 32, 32), top_k=2).probabilities
    torch.testing.assert_close(torch.tensor(json.loads(probabilities)), expected)
