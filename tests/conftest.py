"""Test-wide settings (no test may reach the Hub, every test starts from the same random state) and the tiny
checkpoint that many tests save."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def save_tiny_geoclip(folder, gallery):
    """A tiny random GeoCLIP (seed 0) with `gallery` ((N, 2) degrees), saved to `folder` as `geoloc` commands
    expect it: model, image processor and tokenizer. Returns the model (eval mode)."""
    from geoloc.configs import byte_level_clip_tokenizer, tiny_geoclip_config, tiny_image_processor
    from modeling_geoclip import GeoCLIPModel

    torch.manual_seed(0)
    model = GeoCLIPModel(tiny_geoclip_config()).eval()
    model.set_gallery(gallery)
    model.save_pretrained(folder)
    tiny_image_processor("geoclip").save_pretrained(folder)
    byte_level_clip_tokenizer().save_pretrained(folder)
    return model
