"""CPU inference options for GeoCLIP's CLIP image tower (the dominant cost of a prediction).

`optimize_for_cpu(model, ...)` changes `model.image_tower` in place; every option is opt-in and keeps the
tower's embeddings within cosine 0.99 of float32 eager (measured by `benchmarks/bench_scale.py`, tested on the
tiny tower in `tests/test_tower_speed_options.py`). The location encoder and the gallery are never touched
(GeoCLIP's random Fourier features need float32).
"""

import warnings

import torch
from torch import nn


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bfloat16 kernels on this CPU (AVX512-BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


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
        int8 (`bool`): dynamic int8 quantisation of the transformer layers' `nn.Linear`s (int8 weights, activations
            quantised per batch; `torch.ao.quantization.quantize_dynamic`, still present in torch 2.13 though
            deprecated). float32 only: not combinable with `bf16`.
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
            f"bf16=True needs native bfloat16 CPU kernels (AVX512-BF16 or AMX); this CPU reports "
            f"{torch.backends.cpu.get_cpu_capability()} without them. Use int8=True instead."
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
    if channels_last:
        tower.to(memory_format=torch.channels_last)
    if compile:
        tower.compile()
    return model


__all__ = ["cpu_supports_bf16", "optimize_for_cpu"]
