"""`keep_freed_memory`: freed activations stay in the process for the next op, so a ViT-L/14 MLP activation (batch
8) no longer faults its pages in at every op (in fresh processes: the setting is process-wide); the CLI applies it."""

import platform
import subprocess
import sys

import pytest

FAULTS = """
import resource, sys, torch
from geoloc.allocator import keep_freed_memory
torch.set_num_threads(1)
if sys.argv[1] == "kept":
    assert keep_freed_memory()
x = torch.randn(8 * 257, 4096)  # a ViT-L/14 MLP activation at batch 8: 34 MB, above any default mmap threshold
for _ in range(3):
    x * torch.sigmoid(1.702 * x)  # CLIP's quick_gelu
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x * torch.sigmoid(1.702 * x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_kept_memory_cuts_page_faults():
    default, kept = page_faults("default"), page_faults("kept")
    assert kept * 4 < default, (default, kept)  # measured: 246,750 against 8,224-41,120


def test_cli_keeps_freed_memory_for_inference(monkeypatch, tmp_path):
    import geoloc.cli as cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True))
    assert cli.main(["predict", str(tmp_path / "missing.jpg")]) == 1  # fails on the image, after the setting
    assert calls == [True]
    assert cli.main(["convert", str(tmp_path / "missing.whl"), str(tmp_path / "out")]) == 1  # not inference
    assert calls == [True]


def test_kept_bytes_are_checked():
    from geoloc.allocator import keep_freed_memory

    with pytest.raises(ValueError, match=r"kept_bytes must be between 1 and 1073741824 \(1 GiB\), got 0"):
        keep_freed_memory(0)
