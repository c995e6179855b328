"""`geoloc convert`: convert an official GeoCLIP release into transformers checkpoints.

Sources (read-only; nothing is installed or imported from them):
- the PyPI wheel `geoclip-1.3.0-py3-none-any.whl` (read with `zipfile`), or the folder it unpacks to;
- an official Hub release folder: `config.json` (`model_type` "geoclip-geolocation" or
  "geoclip-location-encoder", `format_version` 1, `sigma`, `backbone`, and `gallery_file` for the
  geolocation release) + `model.safetensors`.

Usage:
    geoloc convert geoclip-1.3.0-py3-none-any.whl ./geoclip-vit-l14
    geoloc convert ./release-folder ./geoclip-location-encoder --location-encoder-only
    geoloc convert geoclip.whl ./geoclip-random --random-backbone   # offline testing only

It lives in `geoloc`, not in `modeling_geoclip`, because it reads galleries with `geoloc.data.gallery` (the package's
one gallery reader) and is no part of the model's Hub remote code.
"""

import argparse
import io
import json
import re
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from modeling_geoclip import (
    GeoCLIPConfig,
    GeoCLIPImageProcessor,
    GeoCLIPLocationEncoder,
    GeoCLIPLocationEncoderConfig,
    GeoCLIPModel,
)
from modeling_geoclip.configuration_geoclip import OFFICIAL_BACKBONE, OFFICIAL_SIGMAS

from ..cli import HelpFormatter
from ..configs import byte_level_clip_tokenizer
from ..data.gallery import read_gallery_csv

RELEASE_TYPES = ("geoclip-geolocation", "geoclip-location-encoder")
# Files of the wheel's `geoclip/model/` folder and the official (Hub release) key prefix of each.
WHEEL_WEIGHTS = {
    "weights/location_encoder_weights.pth": "location_encoder.",
    "weights/image_encoder_mlp_weights.pth": "image_encoder.mlp.",
    "weights/logit_scale_weights.pth": "logit_scale",
}
WHEEL_GALLERY = "gps_gallery/coordinates_100K.csv"
# Official key -> ours. `LocEnc{i}.capsule.0` is the random Fourier feature layer; the capsule's Linear
# layers sit at odd indices (1, 3, 5) with ReLUs between them, ours at even indices (0, 2, 4).
_CAPSULE = r"location_encoder\.LocEnc(\d+)\."
_KEY_RULES = (
    (re.compile(_CAPSULE + r"capsule\.0\.b"), lambda m: f"location_encoder.capsules.{m[1]}.rff_matrix"),
    (re.compile(_CAPSULE + r"capsule\.(\d*[13579])\.(weight|bias)"),
     lambda m: f"location_encoder.capsules.{m[1]}.layers.{int(m[2]) - 1}.{m[3]}"),
    (re.compile(_CAPSULE + r"head\.0\.(weight|bias)"), lambda m: f"location_encoder.capsules.{m[1]}.head.{m[2]}"),
    (re.compile(r"image_encoder\.mlp\.([02])\.(weight|bias)"), lambda m: f"image_mlp.{m[1]}.{m[2]}"),
    (re.compile(r"logit_scale"), lambda m: "logit_scale"),
)
_CONVERTED_PREFIXES = ("location_encoder.", "image_mlp.", "logit_scale")


# ------------------------------------------------------------------------------------- official reading
def _wheel_model_root(path: Path) -> Path:
    for root in (path, path / "model", path / "geoclip" / "model"):
        if (root / next(iter(WHEEL_WEIGHTS))).is_file():
            return root
    raise ValueError(
        f"{path} is neither a GeoCLIP wheel folder (with geoclip/model/{next(iter(WHEEL_WEIGHTS))}) nor a Hub "
        "release folder (with config.json and model.safetensors)."
    )


def _load_pth(data: bytes, name: str):
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise ValueError(f"Cannot read official weights {name}: {error}") from None


def _read_wheel_files(read, where: str) -> tuple[dict, dict]:
    """Weights (Hub release key names) and metadata from the wheel's `geoclip/model/` files; `read(filename)`
    returns a file's bytes, `where` names the folder in error messages."""
    weights = {}
    for filename, prefix in WHEEL_WEIGHTS.items():
        loaded = _load_pth(read(filename), f"{where}/{filename}")
        if isinstance(loaded, torch.Tensor):  # logit_scale_weights.pth holds the bare scalar
            weights[prefix] = loaded
        else:
            weights.update({prefix + key: value for key, value in loaded.items()})
    gallery_csv = io.StringIO(read(WHEEL_GALLERY).decode("utf-8"), newline="")
    gallery = read_gallery_csv(gallery_csv, f"{where}/{WHEEL_GALLERY}")
    return weights, {"sigmas": list(OFFICIAL_SIGMAS), "gallery": gallery, "backbone": OFFICIAL_BACKBONE}


def _read_wheel(source: Path) -> tuple[dict, dict]:
    """Weights and metadata of the PyPI wheel, a `.whl` file or its unpacked folder."""
    if source.is_dir():
        root = _wheel_model_root(source)
        return _read_wheel_files(lambda filename: (root / filename).read_bytes(), str(root))
    with zipfile.ZipFile(source) as archive:
        members = set(archive.namelist())

        def read(filename):
            if f"geoclip/model/{filename}" not in members:
                raise ValueError(f"{source} is not a GeoCLIP wheel: geoclip/model/{filename} is missing.")
            return archive.read(f"geoclip/model/{filename}")

        return _read_wheel_files(read, f"{source}!geoclip/model")


def _read_release(folder: Path) -> tuple[dict, dict]:
    """Weights and metadata of an official Hub release folder (the layout `geoclip/model/_hub.py` reads)."""
    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type") if isinstance(config, dict) else None
    version = config.get("format_version") if isinstance(config, dict) else None
    if model_type not in RELEASE_TYPES or type(version) is not int or version != 1:
        raise ValueError(
            f"{folder / 'config.json'}: expected model_type in {RELEASE_TYPES} with format_version 1, "
            f"got model_type={model_type!r}, format_version={version!r}."
        )
    sigmas = config.get("sigma", list(OFFICIAL_SIGMAS))
    if not isinstance(sigmas, list) or not sigmas or not all(isinstance(s, (int, float)) and s > 0 for s in sigmas):
        raise ValueError(f"{folder / 'config.json'}: sigma must be a list of positive numbers, got {sigmas!r}.")
    weights = load_file(str(folder / "model.safetensors"), device="cpu")
    metadata = {"sigmas": [float(s) for s in sigmas], "gallery": None, "backbone": OFFICIAL_BACKBONE}
    if model_type == "geoclip-location-encoder":
        # `LocationEncoder.from_pretrained` loads this file's keys straight into the encoder: no prefix.
        return {"location_encoder." + key: value for key, value in weights.items()}, metadata
    gallery_file = config.get("gallery_file")
    is_csv_name = isinstance(gallery_file, str) and gallery_file.endswith(".csv")
    if not is_csv_name or Path(gallery_file).name != gallery_file:  # as the official `read_gallery`
        raise ValueError(
            f"{folder / 'config.json'}: gallery_file must name a CSV file in the release, got {gallery_file!r}."
        )
    metadata["gallery"] = read_gallery_csv(folder / gallery_file)
    backbone = config.get("backbone")
    if isinstance(backbone, dict) and isinstance(backbone.get("repo_id"), str):
        metadata["backbone"] = backbone["repo_id"]
    return weights, metadata


def read_official_geoclip(source) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an official GeoCLIP release.

    Args:
        source: the wheel file, its unpacked folder, or a Hub release folder.

    Returns: `(weights, metadata)`: the official state dict with the Hub release's key names
    (`location_encoder.LocEnc{i}...`, `image_encoder.mlp.{0,2}...`, `logit_scale`; a location encoder
    release has only the first), and `{"sigmas": [...], "gallery": (N, 2) array or None, "backbone": str}`.
    """
    source = Path(source)
    if not source.exists():
        raise ValueError(f"GeoCLIP source {source} does not exist.")
    if source.is_dir() and (source / "config.json").is_file() and (source / "model.safetensors").is_file():
        return _read_release(source)
    if source.is_file() and not zipfile.is_zipfile(source):
        raise ValueError(f"{source} is not a wheel (zip) file.")
    return _read_wheel(source)


def convert_official_state_dict(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    """Rename official GeoCLIP weights to ours and check them against `expected` (our state dict subset).

    Args:
        weights: official state dict (Hub release key names).
        expected: our tensors the conversion must fill, `{our_key: tensor}` (names as in `GeoCLIPModel`).

    Returns: `{our_key: tensor}` with exactly the keys of `expected`, in its dtypes.

    Raises:
        ValueError: listing missing and unexpected keys (official names) and shape mismatches.
    """
    converted, unexpected = {}, []
    for key, value in weights.items():
        our_key = next((rename(match) for pattern, rename in _KEY_RULES if (match := pattern.fullmatch(key))), None)
        if our_key not in expected:
            unexpected.append(key)
        else:
            converted[our_key] = value
    missing = sorted(set(expected) - set(converted))
    if missing or unexpected:
        raise ValueError(
            f"Official GeoCLIP weights do not match the model: missing (our names) {missing}, "
            f"unexpected (official names) {sorted(unexpected)}."
        )
    mismatched = [f"{key}: {tuple(converted[key].shape)} != {tuple(expected[key].shape)}"
                  for key in expected if converted[key].shape != expected[key].shape]
    if mismatched:
        raise ValueError(f"Official GeoCLIP weights have the wrong shapes (official != ours): {mismatched}.")
    return {key: converted[key].to(expected[key].dtype) for key in expected}


# ----------------------------------------------------------------------------------------- conversion
def load_official_weights(model, weights: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Copy official GeoCLIP `weights` (release key names, see `read_official_geoclip`) into `model` in place:
    a `GeoCLIPModel`, or with `prefix="location_encoder."` a `GeoCLIPLocationEncoder`. Raises ValueError as
    `convert_official_state_dict` does."""
    state = model.state_dict()
    expected = {prefix + key: value for key, value in state.items() if (prefix + key).startswith(_CONVERTED_PREFIXES)}
    converted = convert_official_state_dict(weights, expected)
    with torch.no_grad():
        for key, value in converted.items():
            state[key.removeprefix(prefix)].copy_(value)


def _clip_configs(backbone_config) -> tuple[CLIPVisionConfig, CLIPTextConfig]:
    if backbone_config is None:  # GeoCLIPConfig's defaults are the official ViT-L/14 towers.
        config = GeoCLIPConfig()
        return config.vision_config, config.text_config
    if isinstance(backbone_config, (str, Path)):
        backbone_config = CLIPConfig.from_pretrained(backbone_config)
    if isinstance(backbone_config, CLIPConfig):
        return backbone_config.vision_config, backbone_config.text_config
    return tuple(backbone_config)


def convert_geoclip(
    source,
    output_dir,
    backbone: str = OFFICIAL_BACKBONE,
    location_encoder_only: bool = False,
    random_backbone: bool = False,
    backbone_config=None,
    show_progress: bool = False,
):
    """Convert an official GeoCLIP release into a transformers checkpoint folder.

    Args:
        source: the `geoclip` wheel (`.whl`), its unpacked folder, or an official Hub release folder.
        output_dir: where to `save_pretrained` the result.
        backbone: Hub id or local folder of the CLIP checkpoint whose vision and text towers (and tokenizer)
            the full model uses; official: `openai/clip-vit-large-patch14`.
        location_encoder_only: write a [`GeoCLIPLocationEncoder`] only (no CLIP, no gallery).
        random_backbone: offline testing only: random CLIP towers shaped by `backbone_config` (default the
            official ViT-L/14 shape) and the byte-level tokenizer; nothing is downloaded.
        backbone_config: with `random_backbone`, a `CLIPConfig`, a path to one, or a
            `(CLIPVisionConfig, CLIPTextConfig)` pair; both projections must be 768 (the official MLP's input).
        show_progress: show a progress bar while the gallery is encoded.

    Returns: the converted model (the full model's gallery is the release's, encoded once and saved).

    Example:
        >>> convert_geoclip("geoclip-1.3.0-py3-none-any.whl", "geoclip-vit-l14")  # doctest: +SKIP
        >>> GeoCLIPModel.from_pretrained("geoclip-vit-l14").config.gallery_size  # doctest: +SKIP
        100000
    """
    if backbone_config is not None and not random_backbone:
        raise ValueError("backbone_config only applies with random_backbone=True (a real backbone brings its own).")
    weights, metadata = read_official_geoclip(source)
    location_config = GeoCLIPLocationEncoderConfig(sigmas=metadata["sigmas"])
    output_dir = Path(output_dir)
    if location_encoder_only:
        model = GeoCLIPLocationEncoder(location_config).eval()
        location_weights = {key: value for key, value in weights.items() if key.startswith("location_encoder.")}
        load_official_weights(model, location_weights, prefix="location_encoder.")
        model.save_pretrained(output_dir)
        return model
    if metadata["gallery"] is None:
        raise ValueError(f"{source} is a location encoder release: convert it with location_encoder_only=True.")
    if random_backbone:
        vision_config, text_config = _clip_configs(backbone_config)
        towers, tokenizer, backbone = None, byte_level_clip_tokenizer(text_config.max_position_embeddings), "random"
    else:
        towers = (
            CLIPVisionModelWithProjection.from_pretrained(backbone, dtype=torch.float32),
            CLIPTextModelWithProjection.from_pretrained(backbone, dtype=torch.float32),
        )
        vision_config, text_config = towers[0].config, towers[1].config
        tokenizer = AutoTokenizer.from_pretrained(backbone)
    config = GeoCLIPConfig(
        vision_config=vision_config, text_config=text_config, location_config=location_config, backbone=backbone
    )
    model = GeoCLIPModel(config).eval()
    if towers is not None:
        model.image_tower.load_state_dict(towers[0].state_dict(), strict=True)
        model.text_tower.load_state_dict(towers[1].state_dict(), strict=True)
    load_official_weights(model, weights)
    model.set_gallery(metadata["gallery"], show_progress=show_progress)
    image_size = vision_config.image_size
    processor = GeoCLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geoloc convert",
        description="Convert an official GeoCLIP release (PyPI wheel, its unpacked folder, or a Hub release "
        "folder) into a transformers checkpoint folder.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("source", help="geoclip-*.whl, its unpacked folder, or a Hub release folder")
    parser.add_argument("output_dir", help="folder to write the converted checkpoint to")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--backbone", default=OFFICIAL_BACKBONE,
                      help=f"Hub id or folder of the CLIP towers and tokenizer (default: {OFFICIAL_BACKBONE})")
    mode.add_argument("--location-encoder-only", action="store_true",
                      help="write only the GPS encoder (GeoCLIPLocationEncoder)")
    mode.add_argument("--random-backbone", action="store_true",
                      help="offline testing: random CLIP towers (ViT-L/14 shape, or --backbone-config) and a "
                      "byte-level tokenizer; predictions are meaningless")
    parser.add_argument("--backbone-config", metavar="CLIP_CONFIG",
                        help="with --random-backbone: a CLIPConfig json file or folder giving the towers' shape")
    return parser


def main(argv=None) -> int:
    """Run `geoloc convert`; bad input raises (`geoloc.cli` prints it as one line with exit status 1)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.backbone_config and not args.random_backbone:
        parser.error("--backbone-config needs --random-backbone")
    model = convert_geoclip(
        args.source, args.output_dir, backbone=args.backbone, location_encoder_only=args.location_encoder_only,
        random_backbone=args.random_backbone, backbone_config=args.backbone_config, show_progress=True,
    )
    print(f"Wrote {type(model).__name__} to {args.output_dir}")
    return 0


if __name__ == "__main__":
    from ..cli import run_command

    run_command("convert")
