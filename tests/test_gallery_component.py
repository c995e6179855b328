"""GeoCLIP's gallery as its own component (`model.gallery`): checkpoints saved before it existed still load (and
resave under the new names), training states resume, and casting the model leaves the stored precision alone."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from geoloc.configs import tiny_geoclip_config
from modeling_geoclip import GeoCLIPModel

GALLERY = [[48.8566, 2.3522], [40.7128, -74.006], [-33.8688, 151.2093], [35.6762, 139.6503], [-1.29, 36.82]]
# What the tensors were called when the gallery's buffers lived on the model itself.
OLD_NAMES = {
    "gallery.coordinates": "gallery_coordinates",
    "gallery.embeddings": "gallery_embeddings",
    "gallery.faiss_index": "gallery_index",
    "gallery.sample_indices": "gallery_sample_indices",
    "gallery.sample_embeddings": "gallery_sample_embeddings",
}


def _saved_with_old_names(model, folder):
    model.save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    assert set(OLD_NAMES) >= {name for name in weights if name.startswith("gallery")}
    save_file({OLD_NAMES.get(name, name): tensor for name, tensor in weights.items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _answers(model):
    queries = torch.nn.functional.normalize(torch.randn(3, model.config.projection_dim,
                                                        generator=torch.Generator().manual_seed(0)), dim=-1)
    return model.search_gallery(queries, top_k=3)


@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_a_checkpoint_with_the_old_gallery_names_loads_and_resaves_under_the_new(tmp_path, backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    model = GeoCLIPModel(tiny_geoclip_config()).eval()
    model.set_gallery(GALLERY, backend=backend)
    old = _saved_with_old_names(model, tmp_path / "old")
    assert any(name.startswith("gallery_") for name in safe_open(old / "model.safetensors", "pt").keys())

    loaded = GeoCLIPModel.from_pretrained(old).eval()  # strict: a missing or unexpected tensor would raise
    for name, tensor in model.gallery.state_dict().items():
        assert torch.equal(loaded.gallery.state_dict()[name], tensor), name
    expected, got = _answers(model), _answers(loaded)
    assert torch.equal(got[1], expected[1]) and torch.allclose(got[0], expected[0])

    loaded.save_pretrained(tmp_path / "resaved")
    names = set(safe_open(tmp_path / "resaved" / "model.safetensors", "pt").keys())
    assert {name for name in names if "gallery" in name} == {
        name for name in OLD_NAMES if name in model.state_dict()}
    assert torch.equal(GeoCLIPModel.from_pretrained(tmp_path / "resaved").gallery.coordinates,
                       model.gallery.coordinates)


def test_a_state_dict_with_the_old_names_loads_into_the_model():
    """A training state saved before the rename (accelerate's `load_state` calls `load_state_dict`) resumes."""
    model = GeoCLIPModel(tiny_geoclip_config())
    model.set_gallery(GALLERY)
    old = {OLD_NAMES.get(name, name): tensor for name, tensor in model.state_dict().items()}
    fresh = GeoCLIPModel(tiny_geoclip_config(gallery_size=len(GALLERY)))
    fresh.load_state_dict(old, strict=True)
    assert torch.equal(fresh.gallery.embeddings, model.gallery.embeddings)
    assert torch.equal(fresh.gallery_locations, model.gallery_locations)


@pytest.mark.parametrize("embedding_dtype", ["float32", "bfloat16"])
def test_casting_the_model_keeps_the_gallery_precision_that_was_chosen(tmp_path, embedding_dtype):
    model = GeoCLIPModel(tiny_geoclip_config())
    model.set_gallery(GALLERY, embedding_dtype=embedding_dtype)
    stored = model.gallery.embeddings.clone()
    model.to(torch.bfloat16)
    assert model.image_mlp[0].weight.dtype == torch.bfloat16
    assert torch.equal(model.gallery.embeddings, stored)  # same dtype, same values: nothing was rounded
    model.to(torch.float32).save_pretrained(tmp_path)
    loaded = GeoCLIPModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.gallery.embeddings.dtype == getattr(torch, embedding_dtype)
    assert torch.equal(loaded.gallery.embeddings, stored)
