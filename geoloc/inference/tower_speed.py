"""Reduced-precision image towers for GeoCLIP inference: the CLIP image tower is the dominant cost of an answer.

`apply_tower(model, "fp32" | "bf16" | "int8")` is what `geoloc predict --tower` and
`Geolocator.from_pretrained(..., tower=...)` call; `optimize_for_cpu(model, ...)` exposes the individual options
(also channels-last and `torch.compile`). Both change `model.image_tower` in place. The location encoder and the
gallery are never touched (GeoCLIP's random Fourier features need float32), so every answer is scored against
the same float32 gallery; only the query embedding moves.

How far they move: `benchmarks/bench_geoclip_predict.py` prints the top-5 agreement of `bf16` and `int8` answers
with the fp32 tower's (ViT-L/14 shape, world-map crops and photo-like images) and their speed on the CPU it runs
on; `tests/test_tower_speed_options.py` checks the embeddings on the tiny tower (cosine >= 0.99 to fp32).

Which to use (measured with the ViT-L/14 shape, README "Reduced-precision image towers"):
- `bf16`: the tower's weights and activations in bfloat16. The fastest on CPUs with AMX (Intel Sapphire Rapids:
  3.2x fp32) and on GPUs; with AVX512-BF16 but no AMX (AMD Zen 4) it ran 2x fp32, behind int8. Refused on CPUs
  without AVX512-BF16 or AMX (`cpu_supports_bf16()`), where bfloat16 is emulated and slower than fp32.
- `int8`: dynamic int8 quantisation of the transformer layers' `nn.Linear`s (int8 weights, activations quantised
  per batch; `torch.ao.quantization.quantize_dynamic`, deprecated in torch 2.10+ but present), with quick_gelu
  fused (`FusedQuickGELU`). CPU only; works on any x86-64 / ARM CPU (VNNI / AMX-INT8 make it faster); the
  fastest on Zen 4 (2.6-3.3x fp32).
"""

import platform
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import QuickGELUActivation

TOWER_CHOICES = ("fp32", "bf16", "int8")
QUICK_GELU_SCALE = 1.702


class FusedQuickGELU(nn.Module):
    """CLIP's quick_gelu, `x * sigmoid(1.702 x)`, computed as `silu(1.702 x) / 1.702`: one fused kernel, in place
    when no gradient is needed, instead of three passes over the MLP activation (on a 2-core Zen 4, 0.43 against
    2.3 ms for one ViT-L/14 layer's 257 x 4096 activation; the whole int8 tower 3-5 % faster). Equal up to float
    rounding (<= 5e-7 on unit-scale inputs), so only the int8 tower uses it: the fp32 tower keeps the official
    arithmetic, and the bf16 tower gained nothing from it on that CPU."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and hidden_states.requires_grad:
            return F.silu(hidden_states * QUICK_GELU_SCALE) / QUICK_GELU_SCALE
        # The input is the MLP's first linear output, which nothing else reads.
        return F.silu(hidden_states.mul_(QUICK_GELU_SCALE), inplace=True).div_(QUICK_GELU_SCALE)


def cpu_supports_bf16() -> bool:
    """True when this CPU multiplies bfloat16 natively: x86 with AVX512-BF16 or AMX, or an ARM CPU for which oneDNN
    has bfloat16 kernels. On x86 oneDNN also accepts bfloat16 on AVX512 CPUs without those instructions (Skylake-X,
    Cascade Lake), emulated and slower than float32, so its own check is not enough there."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(check is not None for check in checks):
        return any(check() for check in checks)
    flags = _cpu_flags()  # older torch without those checks: the kernel's list (empty where unreadable)
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_features() -> dict[str, bool]:
    """The CPU features that decide the best tower: `avx512_bf16`, `amx_bf16`, `amx_int8`, `avx512_vnni` (read
    from /proc/cpuinfo; all False where it cannot be read) and `bf16_kernels` (`cpu_supports_bf16()`)."""
    flags = _cpu_flags()
    features = {name: name in flags for name in ("avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni")}
    return {**features, "bf16_kernels": cpu_supports_bf16()}


def _cpu_flags() -> list[str]:
    """The CPU's flags from /proc/cpuinfo (Linux), or [] where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as file:
            return next((line.split(":", 1)[1].split() for line in file if line.startswith("flags")), [])
    except OSError:
        return []


def apply_tower(model, tower: str = "fp32"):
    """Run `model`'s image tower in `tower` precision ("fp32": unchanged, "bf16", "int8"); in place, returns it.

    Raises:
        ValueError: an unknown `tower`; a model without a CLIP image tower (GeoHier); `int8` on a GPU; `bf16` on a
            CPU without native bfloat16 kernels.
    """
    if tower not in TOWER_CHOICES:
        raise ValueError(f"tower must be one of {', '.join(TOWER_CHOICES)}, got {tower!r}.")
    if tower == "fp32":
        return model
    if getattr(model, "image_tower", None) is None:
        raise ValueError(f"tower={tower!r} applies to GeoCLIP's CLIP image tower; {type(model).__name__} has none "
                         "(use tower='fp32', or dtype=torch.bfloat16 to load the whole model in bfloat16).")
    device = model.image_tower.device
    if tower == "int8" and device.type != "cpu":
        raise ValueError(f"tower='int8' (dynamic int8 quantisation) runs on CPU only; the model is on {device}: "
                         "use tower='bf16' there.")
    if device.type != "cpu":
        model.image_tower.to(torch.bfloat16)
        return model
    return optimize_for_cpu(model, bf16=tower == "bf16", int8=tower == "int8")


def optimize_for_cpu(
    model, bf16: bool = False, int8: bool = False, channels_last: bool = False, compile: bool = False
):
    """Make a GeoCLIP model's image tower fast on CPU, in place; returns the model.

    SDPA attention is always checked (transformers v5 uses `attn_implementation="sdpa"` by default; an eager
    tower is switched to SDPA). The options:

    Args:
        model: a `GeoCLIPModel` (anything with an `image_tower` `CLIPVisionModelWithProjection`).
        bf16 (`bool`): cast the image tower to bfloat16 (needs a CPU with native bf16, see `cpu_supports_bf16`;
            `get_clip_image_embeds` casts the pixels to the tower's dtype).
        int8 (`bool`): dynamic int8 quantisation of the transformer layers' `nn.Linear`s, and CLIP's quick_gelu
            as one fused kernel (`FusedQuickGELU`). float32 only: not combinable with `bf16`.
        channels_last (`bool`): channels-last memory format for the patch-embedding convolution.
        compile (`bool`): `torch.compile` the tower in place (needs a C++ compiler; the first call compiles).

    Raises:
        ValueError: `bf16` and `int8` together, or `bf16` on a CPU without native bf16 kernels.

    Example:
        >>> model = optimize_for_cpu(GeoCLIPModel.from_pretrained(path), int8=True)  # doctest: +SKIP
    """
    if bf16 and int8:
        raise ValueError("bf16 and int8 cannot be combined: dynamic int8 quantisation runs on float32 layers.")
    if bf16 and not cpu_supports_bf16():
        raise ValueError(
            f"The bf16 tower needs a CPU that multiplies bfloat16 natively (AVX512-BF16 or AMX on x86); this one "
            f"({platform.machine()}, {torch.backends.cpu.get_cpu_capability()}) would emulate it, slower than "
            "float32. Use the int8 tower instead."
        )
    tower = model.image_tower
    if tower.config._attn_implementation != "sdpa":
        tower.set_attn_implementation("sdpa")
    if bf16:
        tower.to(torch.bfloat16)
    if int8:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deprecated.*")
            # The transformer layers hold ~all the compute; `visual_projection` stays float (its dtype is the
            # tower's input dtype for `get_clip_image_embeds`).
            torch.ao.quantization.quantize_dynamic(
                tower.vision_model.encoder, {nn.Linear}, dtype=torch.qint8, inplace=True
            )
        _fuse_quick_gelu(tower)
    if channels_last:
        tower.to(memory_format=torch.channels_last)
    if compile:
        tower.compile()
    return model


def _fuse_quick_gelu(tower) -> None:
    """Swap each of `tower`'s quick_gelu activations for `FusedQuickGELU` (other activations are left alone)."""
    for layer in tower.vision_model.encoder.layers:
        if isinstance(layer.mlp.activation_fn, QuickGELUActivation):
            layer.mlp.activation_fn = FusedQuickGELU()


__all__ = ["TOWER_CHOICES", "FusedQuickGELU", "apply_tower", "cpu_features", "cpu_supports_bf16", "optimize_for_cpu"]
