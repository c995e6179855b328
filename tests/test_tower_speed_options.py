"""`optimize_for_cpu`: every image-tower option keeps the embeddings within cosine 0.99 of float32 eager, on
world-map crops and random images, with the tiny tower."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geoloc.configs import TINY_IMAGE_SIZE, tiny_geoclip_config
from geoloc.data.worldmap import render_crop, sample_points
from modeling_geoclip import GeoCLIPModel
from modeling_geoclip.speed import cpu_supports_bf16, optimize_for_cpu


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GeoCLIPModel(tiny_geoclip_config(use_text_tower=False)).eval()


@pytest.fixture(scope="module")
def pixels():
    """8 world-map crops (224x224-pixel windows resized) and 8 random images, CLIP-normalised."""
    rng = np.random.default_rng(0)
    crops = [render_crop(lat, lon, rng, window=224, size=TINY_IMAGE_SIZE) for lat, lon in sample_points(8, rng)]
    crops = torch.from_numpy(np.stack([np.asarray(crop) for crop in crops])).permute(0, 3, 1, 2).float() / 255
    noise = torch.rand(8, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    return (torch.cat([crops, noise]) - 0.45) / 0.27


OPTIONS = [
    pytest.param({"bf16": True}, marks=pytest.mark.skipif(not cpu_supports_bf16(), reason="no native bf16")),
    {"int8": True},
    {"channels_last": True},
    {"compile": True},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda options: next(iter(options)))
def test_option_keeps_embeddings(model, pixels, options):
    with torch.no_grad():
        expected = model.get_clip_image_embeds(pixels)
        optimized = optimize_for_cpu(copy.deepcopy(model), **options)
        actual = optimized.get_clip_image_embeds(pixels).float()
    assert model.image_tower.dtype == torch.float32  # the original is untouched
    cosine = F.cosine_similarity(actual, expected, dim=-1)
    assert cosine.min() >= 0.99, cosine.min()
    # The whole model still answers, through the optimised tower.
    assert optimized.get_image_features(pixels[:2]).shape == (2, optimized.config.projection_dim)


def test_eager_attention_is_switched_to_sdpa(model):
    eager = copy.deepcopy(model)
    eager.image_tower.set_attn_implementation("eager")
    assert optimize_for_cpu(eager).image_tower.config._attn_implementation == "sdpa"


def test_bf16_with_int8_is_a_value_error(model):
    with pytest.raises(ValueError, match="cannot be combined"):
        optimize_for_cpu(copy.deepcopy(model), bf16=True, int8=True)
