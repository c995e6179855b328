"""The README's Python example runs as written, from outside the repository, offline (with the photos it names
put in the folder it runs in)."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    """The first ```python block after the "### Python" heading."""
    text = README.read_text()
    return re.search(r"```python\n(.*?)```", text[text.index("### Python"):], re.S).group(1)


def test_readme_python_example_runs_from_another_folder(tmp_path):
    for index, name in enumerate(["photo.jpg", "photo1.jpg", "photo2.png"]):
        pixels = np.random.default_rng(index).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / name)
    code = python_example()
    assert "my_points" not in code and 'backend="faiss"' not in code  # nothing undefined, nothing not installed
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
