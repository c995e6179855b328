"""Hub remote code: a folder written by `geoloc publish --local-dir` loads both models and their image processors
with `trust_remote_code=True` in a Python where `geoloc`, `geo_core`, `modeling_geoclip` and `modeling_geohier`
cannot be imported, and answers as the package does. The shared modules' copies in both model folders never drift from
their source, `geo_core/`."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_tiny_geoclip
from geoloc.configs import byte_level_clip_tokenizer, tiny_geohier_config, tiny_image_processor
from geoloc.hub.publish import write_local_repo
from geoloc.hub.remote_code import COPY_HEADER, PACKAGES_ROOT, SHARED_MODULES, stale_shared_copies, sync_shared_copies
from modeling_geoclip import GeoCLIPImageProcessor
from modeling_geohier import GeoHierImageProcessor, GeoHierModel
from tests.test_geohier import synthetic_cells

BLOCKED = ("geoloc", "geo_core", "modeling_geoclip", "modeling_geohier")
# Runs in a fresh interpreter: the package's modules cannot be imported, so only the repo's files can serve.
LOAD_AND_PREDICT = """
import importlib, importlib.abc, json, sys

BLOCKED = {blocked!r}


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{{name}} is blocked in this test")


sys.meta_path.insert(0, Blocker())
for name in BLOCKED:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        continue
    raise SystemExit(f"{{name}} is importable")

from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, pipeline

repo, text, images = sys.argv[1], sys.argv[2], sys.argv[3:]
model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
output = model.geolocate(pixel_values=processor(images, return_tensors="pt").pixel_values, top_k=3)
answer = {{
    "model": f"{{type(model).__module__}}.{{type(model).__name__}}",
    "processor": f"{{type(processor).__module__}}.{{type(processor).__name__}}",
    "output_types": [cls.__name__ for cls in type(output).__mro__],
    **{{key: getattr(output, key).tolist() for key in ("latitudes", "longitudes", "probabilities", "indices")}},
}}
# No task given: config.json's custom_pipelines names the repo's own pipeline.
answer["pipeline"] = pipeline(model=repo, trust_remote_code=True)(images[0], top_k=3)
if text:
    tokens = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)([text], return_tensors="pt")
    answer["text_latitudes"] = model.geolocate(
        input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, top_k=3).latitudes.tolist()
print(json.dumps(answer))
"""
TEXT = "a sandy desert under a blue sky"


def _geoclip_checkpoint(folder):
    model = save_tiny_geoclip(folder, np.random.default_rng(0).uniform([-90, -180], [90, 180], size=(20, 2)))
    return model, GeoCLIPImageProcessor.from_pretrained(folder)


def _geohier_checkpoint(folder):
    model = GeoHierModel(tiny_geohier_config()).eval()
    model.set_cell_table(synthetic_cells())
    model.save_pretrained(folder)
    tiny_image_processor("geohier").save_pretrained(folder)
    return model, GeoHierImageProcessor.from_pretrained(folder)


@pytest.mark.parametrize(
    "build, model_module, model_class, processor_module, processor_class",
    [
        (_geoclip_checkpoint, "modeling_geoclip", "GeoCLIPModel", "image_processing_geoclip", "GeoCLIPImageProcessor"),
        (_geohier_checkpoint, "modeling_geohier", "GeoHierModel", "image_processing_geohier", "GeoHierImageProcessor"),
    ],
)
def test_published_folder_loads_as_remote_code_without_the_package(
    build, model_module, model_class, processor_module, processor_class, tmp_path
):
    model, processor = build(tmp_path / "checkpoint")
    has_text = model_class == "GeoCLIPModel"  # GeoHier reads images only
    write_local_repo(tmp_path / "checkpoint", "me/tiny", tmp_path / "repo")
    images = []
    for seed, size in enumerate([(40, 60), (50, 30)]):
        pixels = np.random.default_rng(seed).integers(0, 256, (*size, 4), dtype=np.uint8)  # RGBA: decoded too
        Image.fromarray(pixels, mode="RGBA").save(tmp_path / f"image{seed}.png")
        images.append(str(tmp_path / f"image{seed}.png"))

    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT.format(blocked=BLOCKED), str(tmp_path / "repo"),
         TEXT if has_text else "", *images],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1",
             "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["model"].startswith("transformers_modules.") and loaded["model"].endswith(
        f".{model_module}.{model_class}")
    assert loaded["processor"].startswith("transformers_modules.") and loaded["processor"].endswith(
        f".{processor_module}.{processor_class}")
    # Both models answer with the one shared output type (GeoHier's adds fields in a subclass).
    assert "GeolocationOutput" in loaded["output_types"]

    expected = model.geolocate(pixel_values=processor(images, return_tensors="pt").pixel_values, top_k=3)
    for key in ("latitudes", "longitudes", "probabilities"):
        torch.testing.assert_close(torch.tensor(loaded[key], dtype=torch.float64), getattr(expected, key).double())
    assert loaded["indices"] == expected.indices.tolist()
    keys = ("latitude", "longitude", "probability")
    pipelined = torch.tensor([[row[key] for key in keys] for row in loaded["pipeline"]])
    torch.testing.assert_close(pipelined, torch.stack(
        [getattr(expected, key)[0] for key in ("latitudes", "longitudes", "probabilities")], 1).float())
    if has_text:
        tokens = byte_level_clip_tokenizer()([TEXT], return_tensors="pt")
        expected = model.geolocate(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, top_k=3)
        torch.testing.assert_close(torch.tensor(loaded["text_latitudes"], dtype=torch.float64), expected.latitudes)


def test_shared_module_copies_match_their_source():
    assert stale_shared_copies() == [], "run `python geoloc/hub/remote_code.py --sync`"
    for package in ("modeling_geoclip", "modeling_geohier"):
        for name in SHARED_MODULES:
            copy = (PACKAGES_ROOT / package / name).read_text()
            header = COPY_HEADER.format(source=f"geo_core/{name}")
            assert copy == header + (PACKAGES_ROOT / "geo_core" / name).read_text()


def test_a_drifted_copy_is_reported_and_resynced(tmp_path):
    for package in ("geo_core", "modeling_geoclip", "modeling_geohier"):
        shutil.copytree(PACKAGES_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    assert stale_shared_copies(tmp_path) == []
    source = tmp_path / "geo_core" / "geo_common.py"
    source.write_text(source.read_text().replace("MICRODEGREES = 1_000_000", "MICRODEGREES = 1_000"))
    (tmp_path / "modeling_geohier" / "geo_image_processing.py").unlink()
    stale = ["modeling_geoclip/geo_common.py", "modeling_geohier/geo_common.py", "modeling_geohier/geo_image_processing.py"]
    assert stale_shared_copies(tmp_path) == stale

    assert sync_shared_copies(tmp_path) == stale
    assert stale_shared_copies(tmp_path) == []
    for package in ("modeling_geoclip", "modeling_geohier"):
        assert "MICRODEGREES = 1_000\n" in (tmp_path / package / "geo_common.py").read_text()
    # an edit of the copy alone is drift too
    copy = tmp_path / "modeling_geohier" / "geo_common.py"
    copy.write_text(copy.read_text() + "# local tweak\n")
    assert stale_shared_copies(tmp_path) == ["modeling_geohier/geo_common.py"]


def test_sync_script_runs_without_importing_the_packages(tmp_path):
    # A source edit that the copies lack can break `import modeling_geohier`: the script must not need it, so it
    # runs without site-packages (no torch, transformers or this package).
    result = subprocess.run([sys.executable, "-I", "-S", str(PACKAGES_ROOT / "geoloc" / "hub" / "remote_code.py"), "--check"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "all copies in sync", result.stderr


def test_model_folders_and_the_core_import_no_package_of_this_repository():
    # Pushed alone as remote code: only their own files (relative imports) and the libraries transformers brings
    # (faiss is optional, imported when an index is used; tokenizers builds the offline test tokenizer).
    import ast

    allowed = {"torch", "transformers", "safetensors", "numpy", "PIL", "huggingface_hub", "tokenizers", "faiss"}
    for folder in ("geo_core", "modeling_geoclip", "modeling_geohier"):
        for module in sorted((PACKAGES_ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(module.read_text("utf-8"))):
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for name in names:
                    top = name.split(".")[0]
                    assert top in allowed or top in sys.stdlib_module_names, f"{folder}/{module.name} imports {name}"


def test_one_list_of_model_families_drives_every_registry():
    """A new model is one `ModelFamily` entry (plus its folder and task): registration, remote code, the shared
    copies, card names, the Space's packages and the installed packages all read `MODEL_FAMILIES`, in a fresh
    process too (the `--sync` file run reads the list without importing the packages)."""
    import fnmatch
    import tomllib

    from transformers import AutoConfig

    from geoloc.hub import publish, remote_code, space
    from geoloc.models import MODEL_FAMILIES, register_models

    register_models()
    types = [family.model_type for family in MODEL_FAMILIES]
    assert types == ["geoclip", "geohier"] and list(remote_code.AUTO_CLASSES) == types
    assert list(publish.FAMILY_NAMES) == types and space.PACKAGES[2:] == remote_code.MODEL_PACKAGES
    include = tomllib.loads((PACKAGES_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for family in MODEL_FAMILIES:
        assert (PACKAGES_ROOT / family.package / "__init__.py").is_file()
        assert any(fnmatch.fnmatch(family.package, pattern) for pattern in include["include"])
        assert type(AutoConfig.for_model(family.model_type)).__name__ == family.config
        assert family.package in {path.parent.name for _, path in remote_code._copies(PACKAGES_ROOT)}
    run = subprocess.run([sys.executable, str(PACKAGES_ROOT / "geoloc" / "hub" / "remote_code.py"), "--check"],
                         capture_output=True, text=True, cwd="/")
    assert run.returncode == 0 and "in sync" in run.stdout, run.stderr
