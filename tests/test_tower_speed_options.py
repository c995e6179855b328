"""`optimize_for_cpu`: every image-tower option keeps the embeddings within cosine 0.99 of float32 eager, on
world-map crops and random images, with the tiny tower; `--tower` / `Geolocator.from_pretrained(tower=...)` reach
it (`apply_tower`), and a bad choice is one line on stderr with exit status 1."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geoloc.cli import main
from geoloc.configs import TINY_IMAGE_SIZE, tiny_geoclip_config
from geoloc.data.worldmap import render_crop, sample_points
from geoloc.inference.adapter import Geolocator
from geoloc.inference import tower_speed
from geoloc.inference.tower_speed import FusedQuickGELU, apply_tower, cpu_supports_bf16, optimize_for_cpu
from modeling_geoclip import GeoCLIPModel
from transformers.activations import QuickGELUActivation


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


def test_fused_quick_gelu_matches_clip_and_its_gradient():
    """silu(1.702 x) / 1.702 is CLIP's x * sigmoid(1.702 x) up to float rounding, with and without a gradient."""
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 4
    expected = QuickGELUActivation()(x)
    with torch.no_grad():
        torch.testing.assert_close(FusedQuickGELU()(x.clone()), expected, rtol=0, atol=2e-6)
    leaf = x.clone().requires_grad_()
    FusedQuickGELU()(leaf).sum().backward()
    reference = x.clone().requires_grad_()
    QuickGELUActivation()(reference).sum().backward()
    torch.testing.assert_close(leaf.grad, reference.grad, rtol=0, atol=2e-6)
    assert torch.equal(leaf.detach(), x)  # the input a gradient needs is not overwritten


def activations(model) -> set[str]:
    return {type(layer.mlp.activation_fn).__name__ for layer in model.image_tower.vision_model.encoder.layers}


def quantized_linears(model) -> int:
    return sum(type(module).__name__ == "Linear" and "quantized" in type(module).__module__
               for module in model.image_tower.modules())


def test_apply_tower_wiring(model):
    assert apply_tower(model, "fp32") is model and quantized_linears(model) == 0
    assert activations(model) == {"QuickGELUActivation"}  # the fp32 tower keeps the official arithmetic
    int8 = apply_tower(copy.deepcopy(model), "int8")
    assert quantized_linears(int8) == 6 * model.config.vision_config.num_hidden_layers  # q, k, v, o, fc1, fc2
    assert activations(int8) == {"FusedQuickGELU"}
    assert int8.location_encoder.dtype == torch.float32 and int8.gallery.embeddings.dtype == torch.float32
    if cpu_supports_bf16():
        bf16 = apply_tower(copy.deepcopy(model), "bf16")
        assert bf16.image_tower.dtype == torch.bfloat16 and bf16.location_encoder.dtype == torch.float32
        assert activations(bf16) == {"QuickGELUActivation"}
    with pytest.raises(ValueError, match="tower must be one of fp32, bf16, int8, got 'fp16'"):
        apply_tower(model, "fp16")


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, False), (True, False, True), (False, True, True)])
def test_bf16_needs_native_instructions_on_x86(monkeypatch, model, avx512_bf16, amx, expected):
    """oneDNN accepts bfloat16 on any AVX512 CPU (its own check is true on Skylake-X / Cascade Lake, where it emulates
    bfloat16 slower than float32): an x86 CPU needs AVX512-BF16 or AMX, else the bf16 tower is refused."""
    monkeypatch.setattr(tower_speed.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert cpu_supports_bf16() is expected
    # an older torch without those checks: the flags of /proc/cpuinfo decide
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    flags = ["avx512f"] + ["avx512_bf16"] * avx512_bf16 + ["amx_bf16"] * amx
    monkeypatch.setattr(tower_speed, "_cpu_flags", lambda: flags)
    assert cpu_supports_bf16() is expected
    if not expected:
        with pytest.raises(ValueError, match=r"needs a CPU that multiplies bfloat16 natively .* Use the int8 tower"):
            apply_tower(copy.deepcopy(model), "bf16")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.conftest import save_tiny_geoclip

    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_geoclip(folder, [[48.85, 2.35], [40.71, -74.0], [-33.87, 151.21], [35.68, 139.65], [64.1, -21.9]])
    return folder


@pytest.mark.parametrize("tower", ["int8", pytest.param("bf16", marks=pytest.mark.skipif(
    not cpu_supports_bf16(), reason="no native bf16"))])
def test_geolocator_tower_option_answers_like_fp32(checkpoint, tower):
    image = np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    [expected] = Geolocator.from_pretrained(checkpoint).locate_images([image], top_k=3)
    geolocator = Geolocator.from_pretrained(checkpoint, tower=tower)
    if tower == "int8":
        assert quantized_linears(geolocator.model) > 0
    else:
        assert geolocator.model.image_tower.dtype == torch.bfloat16
    [result] = geolocator.locate_images([image], top_k=3)
    assert result.error is None and result.latitudes[0] == expected.latitudes[0]


def test_geolocator_bad_tower_fails_before_loading(tmp_path):
    with pytest.raises(ValueError, match="tower must be one of"):
        Geolocator.from_pretrained(tmp_path / "missing", tower="int4")


def test_cli_tower_option(checkpoint, capsys):
    assert main(["predict", "--model", str(checkpoint), "--tower", "int8", "--json"]) == 0
    assert '"latitude"' in capsys.readouterr().out
    assert main(["predict", "--model", str(checkpoint), "--tower", "fp16"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("geoloc: error:") or line.startswith("geoloc predict: error:")
    assert "--tower" in line and "invalid choice: 'fp16'" in line


def test_benchmark_agreement_counts_near_ties_and_distance():
    """`bench_geoclip_predict._agreement`: order / set / best / set up to near-ties (fp32 log-probability within
    `TIE_TOLERANCE` of fp32's fifth), then how far the best point moved."""
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_geoclip_predict import TIE_TOLERANCE, _agreement, _near_ties

    def result(latitudes, probabilities):
        return SimpleNamespace(latitudes=np.array(latitudes, float), longitudes=np.zeros(len(latitudes)),
                               probabilities=np.array(probabilities, float))

    probabilities = [0.30, 0.20, 0.15, 0.10, 0.0995, 0.0990, 0.05]  # fifth and sixth within 0.5%: a near-tie
    reference = result([0, 1, 2, 3, 4, 5, 6], probabilities)
    assert np.log(probabilities[4] / probabilities[5]) < TIE_TOLERANCE
    same = result([0, 1, 2, 3, 4], probabilities[:5])
    tie_swapped = result([0, 1, 2, 3, 5], probabilities[:5])
    reordered = result([1, 0, 2, 3, 4], probabilities[:5])
    far_swapped = result([0, 1, 2, 3, 6], probabilities[:5])
    text = _agreement([same, tie_swapped, reordered, far_swapped], [reference] * 4)
    figures, moved = text.split("; moved best: ")
    assert [float(x) for x in figures.split(" / ")] == [0.25, 0.5, 0.75, 0.75]
    assert moved == "111 / 111 km"  # one degree of latitude at the equator, the only best point that moved
    assert _near_ties([reference, result(list(range(7)), [0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05])]) == 0.5
