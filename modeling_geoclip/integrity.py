# Generated from geo_core/integrity.py by `python geoloc/hub/remote_code.py --sync`; do not edit.
"""Checks that what a model loads, and what it answers, is sound: shared by every model of this package.

`from_pretrained` calls them around transformers' loading:
- before: `check_config_against_checkpoint` builds the model from its config on the meta device (nothing is
  allocated) and compares every tensor it implies with the safetensors header, so a config that claims more
  than the file holds (a gallery of 1e9 points, a huge cell table or queue, present in the file or missing
  from it) fails at once instead of allocating gigabytes; a pickle-only checkpoint is refused unless
  `use_safetensors=False` asks for it;
- after: `check_finite_tensors` refuses NaN/inf in any floating weight or buffer, naming it; the model's own
  checks (coordinates in range, hashes of stored bytes) follow.
`check_finite_answer` makes a NaN in a `geolocate` answer an error instead of a printed number.

The single source is `geo_core/integrity.py`; `modeling_geoclip/integrity.py` and `modeling_geohier/integrity.py` are
generated copies (each model folder is pushed to the Hub alone as remote code). Edit the source, then run
`python geoloc/hub/remote_code.py --sync`. Imports only torch, safetensors and transformers.
"""

import hashlib
import itertools
import json
import warnings

import torch
from safetensors import safe_open
from transformers.utils import cached_file

# `from_pretrained` arguments that say where the checkpoint files are.
_LOCATION_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
# Elements checked at a time by `check_finite_tensors` (bounds the temporary boolean mask).
_CHUNK = 1 << 24
# Bytes a config may imply beyond what the checkpoint holds (tensors initialised, not loaded: missing ones with
# strict=False, re-initialised ones, computed buffers), checked before anything is allocated.
FRESH_BYTES = 1 << 30


def checkpoint_files(pretrained, kwargs: dict) -> list[str]:
    """Local paths of a checkpoint's safetensors files (one file, or the shards of its index; downloaded from
    the Hub when `pretrained` is a repo id). Empty when the checkpoint has none (e.g. a PyTorch `.bin`)."""
    location = {key: kwargs[key] for key in _LOCATION_KWARGS if key in kwargs}

    def find(name: str) -> str | None:
        return cached_file(pretrained, name, _raise_exceptions_for_missing_entries=False, **location)

    single = find("model.safetensors")
    if single:
        return [single]
    index = find("model.safetensors.index.json")
    if not index:
        return []
    with open(index) as handle:
        shards = sorted(set(json.load(handle)["weight_map"].values()))
    return [find(shard) for shard in shards]


def checkpoint_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
    """`{tensor name: shape}` read from the safetensors headers only (no tensor is loaded).

    Raises:
        ValueError: naming a file that is not a readable safetensors file (truncated, corrupt).
    """
    shapes = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except Exception as error:  # safetensors raises SafetensorError (not an OSError) for a bad header
            raise ValueError(f"'{file}' is not a readable safetensors file (truncated or corrupt): {error}") from None
    return shapes


def _refuse_pickle_checkpoint(pretrained, kwargs: dict) -> None:
    """A checkpoint without safetensors files loads from a pickle (`pytorch_model.bin`): unpickling can run
    code, and its shapes cannot be read before loading. Only `use_safetensors=False` asks for it."""
    location = {key: kwargs[key] for key in _LOCATION_KWARGS if key in kwargs}
    for name in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
        found = cached_file(pretrained, name, _raise_exceptions_for_missing_entries=False, **location)
        if found and kwargs.get("use_safetensors") is not False:
            raise ValueError(
                f"The checkpoint '{pretrained}' holds only a pickle file ({name}), not safetensors: unpickling can "
                "run code and its sizes cannot be checked before loading. Convert it to safetensors, or pass "
                "use_safetensors=False to load it anyway (only from a source you trust)."
            )


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def check_config_against_checkpoint(model_class, pretrained, kwargs: dict, strict: bool = True,
                                    ignore_mismatched_sizes: bool = False) -> dict[str, str]:
    """Refuse a checkpoint whose config implies tensors the file does not hold as described (other shapes,
    missing ones), before anything is allocated, and a pickle checkpoint unless asked for. Tensors saved under
    a name the model has since changed (`model_class.renamed_keys`, old name -> new) are checked under the new one.

    Args:
        model_class: the `PreTrainedModel` subclass being loaded.
        pretrained: the folder or Hub id given to `from_pretrained`.
        kwargs: the other `from_pretrained` keyword arguments (`config`, `revision`, `cache_dir`...).
        strict: refuse tensors missing from the file (else they are initialised, within `FRESH_BYTES`).
        ignore_mismatched_sizes: allow other shapes (re-initialised, within `FRESH_BYTES`).

    Raises:
        ValueError: naming each tensor whose shapes differ (file vs config), each missing tensor, the bytes
            that would be initialised beyond the budget, a file that is not safetensors, a pickle checkpoint,
            or a config from which the model cannot be built (e.g. a size of 0).

    Returns: `{old name: new name}` for the renamed tensors the file holds under their old names (empty for a
    pickle checkpoint, whose names cannot be read before loading).
    """
    files = checkpoint_files(pretrained, kwargs)
    if not files:
        _refuse_pickle_checkpoint(pretrained, kwargs)
        return {}
    config = kwargs.get("config")
    if not hasattr(config, "to_dict"):  # None, or a path to another config
        location = {key: kwargs[key] for key in _LOCATION_KWARGS if key in kwargs}
        config = model_class.config_class.from_pretrained(config or pretrained, **location)
    found = checkpoint_shapes(files)
    renamed = {old: new for old, new in getattr(model_class, "renamed_keys", {}).items() if old in found}
    found = {renamed.get(name, name): shape for name, shape in found.items()}
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a trial build: its warnings come again when the model is built
            model = model_class(config)
    except ValueError:
        raise
    except Exception as error:  # e.g. ZeroDivisionError from a hidden size of 0 in a sub-config
        raise ValueError(
            f"Cannot build {model_class.__name__} from the config of '{pretrained}' ({type(error).__name__}: "
            f"{error}): check its values (sizes must be positive, heads must divide widths)."
        ) from error
    # every tensor the config implies (parameters, persistent and computed buffers), present in the file or not
    implied = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    wrong = [name for name in sorted(implied) if name in found and found[name] != tuple(implied[name].shape)]
    missing = [name for name in model.state_dict() if name not in found]
    problems = {
        "wrong shape (checkpoint vs model)": [] if ignore_mismatched_sizes else [
            f"{name}: {found[name]} vs {tuple(implied[name].shape)}" for name in wrong],
        "missing": sorted(missing) if strict else [],
    }
    details = "; ".join(f"{kind}: {names}" for kind, names in problems.items() if names)
    if details:
        raise ValueError(
            f"The checkpoint '{pretrained}' does not match {model_class.__name__} as its config describes it "
            f"({details}); nothing was allocated. The config's sizes (e.g. gallery_size, cells_per_level) must "
            "describe the saved tensors; strict=False loads a partial checkpoint, ignore_mismatched_sizes=True "
            "re-initialises wrongly shaped weights."
        )
    fresh = {name: _tensor_bytes(implied[name]) for name in set(wrong) | set(missing) | (set(implied) - set(
        model.state_dict()))}
    if sum(fresh.values()) > FRESH_BYTES:
        largest = sorted(fresh, key=fresh.get, reverse=True)[:3]
        raise ValueError(
            f"The config of '{pretrained}' implies {sum(fresh.values())} bytes of tensors the checkpoint does not "
            f"hold (largest: {[f'{name}: {tuple(implied[name].shape)}' for name in largest]}), above "
            f"{FRESH_BYTES} bytes; nothing was allocated. Check its sizes (gallery_size, queue_size, "
            "gallery_index_nbytes, cells_per_level)."
        )
    return renamed


def check_finite_tensors(model: torch.nn.Module) -> None:
    """Refuse NaN or inf in any floating parameter or buffer of a loaded model.

    Raises:
        ValueError: naming the first tensor that holds one, and how many values are bad.
    """
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        chunks = tensor.detach().reshape(-1).split(_CHUNK)
        # x * 0 is 0 for finite x and NaN for NaN or inf: one fast pass (twice as fast as isfinite().all())
        if all(bool(torch.isfinite((chunk * 0).sum())) for chunk in chunks):
            continue
        bad = sum(int((~torch.isfinite(chunk)).sum()) for chunk in chunks)
        raise ValueError(
            f"The checkpoint's tensor '{name}' holds {bad} NaN or infinite value(s) out of {tensor.numel()}: "
            "the file is corrupt or the training diverged."
        )


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Hex SHA-256 of a tensor's bytes (for stored byte blobs such as a serialised FAISS index)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def check_finite_answer(**tensors: torch.Tensor) -> None:
    """Refuse a `geolocate` answer with NaN or inf (from NaN inputs, or weights that escaped the checks).

    Args:
        **tensors: the answer's `(B, top_k)` tensors by name (latitudes, longitudes, probabilities).

    Raises:
        ValueError: naming the tensor and the first input row affected.
    """
    for name, tensor in tensors.items():
        bad = ~torch.isfinite(tensor)
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"geolocate produced NaN or inf in {name} for input {row} (from the inputs, or from the model): "
                "no answer is given."
            )


__all__ = [
    "FRESH_BYTES",
    "check_config_against_checkpoint",
    "check_finite_answer",
    "check_finite_tensors",
    "checkpoint_files",
    "checkpoint_shapes",
    "tensor_sha256",
]
