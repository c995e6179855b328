"""Continuing a GeoHier checkpoint on new geocells (regression): `geoloc train --model geohier --model-config CKPT`
builds its geocells from the training coordinates, so the cell counts differ from the checkpoint's and
`from_pretrained(..., cells_per_level=new, ignore_mismatched_sizes=True)` re-initialises the heads and the cell
table. The re-initialised (zero) table used to keep the checkpoint's `has_cell_table=True`, and the load check
refused it ("Level 0, cell 0: parent index 0 must be -1"): a re-initialised table is no table."""

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from geoloc.configs import tiny_geohier_config, tiny_image_processor
from geoloc.training.train import main
from geoloc.data.worldmap import build_worldmap_splits, write_imagefolder
from modeling_geohier import GeoHierModel
from tests.test_geohier import synthetic_cells


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("geohier-checkpoint"))
    torch.manual_seed(0)
    model = GeoHierModel(tiny_geohier_config()).eval()
    model.set_cell_table(synthetic_cells())
    model.save_pretrained(folder)
    tiny_image_processor("geohier").save_pretrained(folder)
    return folder


def test_new_cell_counts_load_without_a_table_and_take_a_new_one(checkpoint):
    kept = GeoHierModel.from_pretrained(checkpoint)
    assert kept.config.has_cell_table and kept.get_cell_table()[0]["parents"].tolist() == [-1] * 8

    sizes = (4, 8, 12)
    model = GeoHierModel.from_pretrained(checkpoint, cells_per_level=list(sizes), ignore_mismatched_sizes=True)
    assert not model.config.has_cell_table  # the checkpoint's table does not fit: none, not a table of zeros
    with pytest.raises(ValueError, match="no cell table"):
        model.geolocate(pixel_values=torch.zeros(1, 3, 32, 32))
    torch.testing.assert_close(model.token_projection.weight, kept.token_projection.weight)  # the rest is kept
    model.set_cell_table(synthetic_cells(sizes))
    assert model.config.has_cell_table and model.geolocate(pixel_values=torch.zeros(1, 3, 32, 32), top_k=2)

    # Only one level re-initialised: the table is no longer the checkpoint's either.
    partly = GeoHierModel.from_pretrained(checkpoint, cells_per_level=[8, 16, 33], ignore_mismatched_sizes=True)
    assert not partly.config.has_cell_table


def test_a_stored_table_of_zeros_is_still_refused(checkpoint, tmp_path):
    # The fix concerns tables this load re-initialised; a checkpoint that stores an invalid table is refused as before.
    folder = tmp_path / "zeros"
    shutil.copytree(checkpoint, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights = {key: torch.zeros_like(value) if key.startswith("cell_table.parents") else value
               for key, value in weights.items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="parent index 0 must be -1"):
        GeoHierModel.from_pretrained(str(folder))


def test_train_continues_a_checkpoint_on_freshly_built_geocells(checkpoint, tmp_path):
    data = str(tmp_path / "worldmap")
    write_imagefolder(build_worldmap_splits(64, 4, seed=0), data)
    out = str(tmp_path / "continued")
    assert main(["--model", "geohier", "--model-config", checkpoint, "--dataset", data, "--output-dir", out,
                 "--max-steps", "1", "--batch-size", "8", "--threads", "1"]) == 0
    model = GeoHierModel.from_pretrained(out)
    table = model.get_cell_table()
    assert model.config.has_cell_table and model.config.cells_per_level != [8, 16, 32]
    assert [len(level["tokens"]) for level in table] == model.config.cells_per_level
    assert (table[0]["parents"] == -1).all() and np.isfinite(table[-1]["latitudes"]).all()
