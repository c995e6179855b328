"""Test-wide settings (no test may reach the Hub, every test starts from the same random state) and the tiny
checkpoint that many tests save."""

import os
import socket
import sys

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


def accelerate_launch(num_processes: int = 2) -> list[str]:
    """The command prefix that starts `num_processes` CPU ranks with `accelerate launch` (run it with
    `ACCELERATE_USE_CPU=1`: torchrun-style ranks on CPU are `--multi_gpu` plus that variable), on a port of its
    own: tests run in parallel, and two launches on accelerate's default port 29500 can join each other's
    rendezvous and hang."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
            "--dynamo_backend", "no"]
