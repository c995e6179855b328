# Generated from geo_core/geo_common.py by `python geoloc/hub/remote_code.py --sync`; do not edit.
"""What every model of this package shares: coordinate validation and storage, moving points on the sphere,
the `top_k` check, the `geolocate` output type and strict checkpoint loading.

The single source is `geo_core/geo_common.py`, which neither model owns; `modeling_geoclip/geo_common.py` and
`modeling_geohier/geo_common.py` are generated copies (each model folder is pushed to the Hub alone as remote
code, which allows only relative imports, so each folder needs the file). Edit the source, then run `python geoloc/hub/remote_code.py --sync`;
`tests/test_remote_code.py` fails while a copy differs. Imports only torch, numpy and transformers.
"""

import re
from dataclasses import dataclass

import numpy as np
import torch
from transformers.utils import ModelOutput

from .integrity import check_config_against_checkpoint, check_finite_tensors

# IUGG mean Earth radius R1 = (2a + b) / 3 of WGS84, km: the sphere of every spherical formula of the models.
EARTH_MEAN_RADIUS_KM = 6371.0088

# Coordinates kept in a model (gallery, GPS queue, cell centroids) are stored as int32 micro-degrees so that
# `model.to(torch.bfloat16)` or `from_pretrained(..., dtype=...)` can never round them (bf16 keeps ~3 digits).
MICRODEGREES = 1_000_000


def to_microdegrees(locations: torch.Tensor) -> torch.Tensor:
    """(..., 2) degrees -> (..., 2) int32 micro-degrees, the dtype-proof storage of coordinates."""
    return torch.round(torch.as_tensor(locations).to(torch.float64) * MICRODEGREES).to(torch.int32)


def from_microdegrees(coordinates: torch.Tensor) -> torch.Tensor:
    """(..., 2) int32 micro-degrees -> float64 degrees."""
    return coordinates.to(torch.float64) / MICRODEGREES


def coordinate_rule_violations(latitudes, longitudes) -> tuple[tuple[object, str], ...]:
    """The coordinate rules, one home for every validator: `(mask, rule)` per rule, in the order that names a
    row breaking several, where `mask` marks which of N (latitude, longitude) degrees break it.

    Args:
        latitudes, longitudes: `(N,)` torch tensors or numpy float arrays (the masks are of the same kind).

    Example:
        >>> [mask.tolist() for mask, _ in coordinate_rule_violations(np.array([95.0]), np.array([0.0]))]
        [[False], [True], [False]]
    """
    lib = torch if isinstance(latitudes, torch.Tensor) else np
    with np.errstate(invalid="ignore"):  # NaN breaks the first rule only
        return (
            (~(lib.isfinite(latitudes) & lib.isfinite(longitudes)), "coordinates must be finite (no NaN or inf)"),
            (lib.abs(latitudes) > 90, "latitude must be in [-90, 90]"),
            (lib.abs(longitudes) > 180, "longitude must be in [-180, 180]"),
        )


def validate_locations(locations, name: str = "locations") -> torch.Tensor:
    """Check GPS coordinates and return them as a floating tensor of shape (N, 2), (latitude, longitude).

    Latitudes must lie in [-90, 90], longitudes in [-180, 180], all finite (`coordinate_rule_violations`).
    Nothing is wrapped or clipped.

    Args:
        locations: tensor, numpy array or nested list of shape (N, 2), degrees.
        name: how the argument is called in error messages.

    Raises:
        ValueError: naming the first bad row and value.

    Example:
        >>> validate_locations([[48.8566, 2.3522]]).shape
        torch.Size([1, 2])
    """
    if not isinstance(locations, torch.Tensor):
        try:
            locations = torch.as_tensor(np.asarray(locations, dtype=np.float64))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} must be numbers of shape (N, 2) as (latitude, longitude): {error}") from None
    if locations.ndim != 2 or locations.shape[-1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) as (latitude, longitude), got {tuple(locations.shape)}.")
    if not locations.is_floating_point():
        locations = locations.float()
    for bad, rule in coordinate_rule_violations(locations[:, 0], locations[:, 1]):
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            lat, lon = locations[row].tolist()
            raise ValueError(f"{name}[{row}] = ({lat}, {lon}): {rule} (degrees, (latitude, longitude) order).")
    return locations


def destination_points(locations: torch.Tensor, bearings: torch.Tensor, distances_km: torch.Tensor) -> torch.Tensor:
    """The one formula that moves points by a distance on the Earth (a sphere of `EARTH_MEAN_RADIUS_KM`): along
    the great circle leaving each location at its bearing. Used by GPS noise in training and by refinement.

    Args:
        locations (`torch.Tensor` of shape `(N, 2)`): start points, (latitude, longitude) degrees.
        bearings (`torch.Tensor` of shape `(N, ...)`): radians clockwise from north.
        distances_km (`torch.Tensor`, same shape as `bearings`): km along the great circle (>= 0).

    Returns: `torch.DoubleTensor` of shape `bearings.shape + (2,)`: valid (lat, lon) degrees, longitudes wrapped
    into [-180, 180).

    Example:
        >>> destination_points(torch.tensor([[0.0, 0.0]]), torch.tensor([0.0]), torch.tensor([111.195]))[0, 0]
        tensor(1.0000, dtype=torch.float64)
    """
    locations = torch.as_tensor(locations).to(torch.float64)
    bearings = torch.as_tensor(bearings, dtype=torch.float64, device=locations.device)
    angles = torch.as_tensor(distances_km, dtype=torch.float64, device=locations.device) / EARTH_MEAN_RADIUS_KM
    extra = (1,) * (bearings.ndim - 1)
    lat0 = torch.deg2rad(locations[:, 0]).reshape(-1, *extra)
    lon0 = torch.deg2rad(locations[:, 1]).reshape(-1, *extra)
    sin_lat = torch.sin(lat0) * torch.cos(angles) + torch.cos(lat0) * torch.sin(angles) * torch.cos(bearings)
    latitude = torch.asin(sin_lat.clamp(-1, 1))
    longitude = lon0 + torch.atan2(torch.sin(bearings) * torch.sin(angles) * torch.cos(lat0),
                                   torch.cos(angles) - torch.sin(lat0) * sin_lat)
    longitude = torch.remainder(longitude + torch.pi, 2 * torch.pi) - torch.pi
    return torch.stack((torch.rad2deg(latitude), torch.rad2deg(longitude)), dim=-1)


def check_top_k(top_k, n_candidates: int) -> int:
    """Return `top_k` as an int, or raise ValueError unless 1 <= top_k <= n_candidates.

    Example:
        >>> check_top_k(3, 10)
        3
    """
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise ValueError(f"top_k must be an integer, got {top_k!r}.")
    if not 1 <= top_k <= n_candidates:
        raise ValueError(f"top_k must be between 1 and {n_candidates} (the number of candidates), got {top_k}.")
    return int(top_k)


@dataclass
class GeolocationOutput(ModelOutput):
    """The answer of `geolocate`, shared by every model of this package (a model may return a subclass with
    extra fields).

    Args:
        latitudes (`torch.FloatTensor` of shape `(batch_size, top_k)`): predicted latitudes, degrees, best first.
        longitudes (`torch.FloatTensor` of shape `(batch_size, top_k)`): predicted longitudes, degrees.
        probabilities (`torch.FloatTensor` of shape `(batch_size, top_k)`): the model's probability of each
            prediction (each model's `geolocate` says how it is computed).
        indices (`torch.LongTensor` of shape `(batch_size, top_k)`): the candidates' rows (GeoCLIP: gallery rows,
            -1 for points found by `refine=True`; GeoHier: fine-cell rows).
    """

    latitudes: torch.Tensor | None = None
    longitudes: torch.Tensor | None = None
    probabilities: torch.Tensor | None = None
    indices: torch.Tensor | None = None


class StrictFromPretrainedMixin:
    """Put before `PreTrainedModel` in the bases: `from_pretrained` refuses checkpoints that do not match, and
    checkpoints that hold tensors under names the model has since changed load under the new names."""

    # Old checkpoint tensor name -> current name (exact names), for tensors a model has renamed. Applied by
    # `from_pretrained` and `load_state_dict` (a training state saved before the rename resumes too).
    renamed_keys: dict[str, str] = {}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.renamed_keys:
            self._register_load_state_dict_pre_hook(self._rename_old_keys)

    def _rename_old_keys(self, state_dict, prefix, *_) -> None:
        for old, new in self.renamed_keys.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)

    @classmethod
    def from_pretrained(cls, *args, strict: bool = True, output_loading_info: bool = False, **kwargs):
        """`PreTrainedModel.from_pretrained`, but a checkpoint with missing, unexpected or wrongly shaped
        weights raises a `ValueError` naming them (transformers v5 only logs the first two and randomly
        initialises what is missing; a missing buffer such as a gallery or cell table would silently be zeros).
        `strict=False` loads a partial checkpoint on purpose; `ignore_mismatched_sizes=True` re-initialises
        wrongly shaped weights, as in transformers.

        Also a `ValueError`, naming the tensor: a config whose sizes disagree with the safetensors header
        (checked before anything is allocated), NaN/inf in a weight or buffer, and what the model's
        `check_loaded_state` refuses (see `integrity`). A pickle-only checkpoint (`pytorch_model.bin`) loads only
        with `use_safetensors=False`; stored bytes without a recorded hash (an old FAISS index) only with
        `require_hashes=False`: ask for either only for a source you trust."""
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        require_hashes = kwargs.pop("require_hashes", True)
        pretrained = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        renaming = {}
        if pretrained is not None and kwargs.get("state_dict") is None:
            renamed = check_config_against_checkpoint(cls, pretrained, kwargs, strict, ignore_mismatched_sizes)
            # exact names: transformers reads the mapping's keys as regular expressions
            renaming = {f"^{re.escape(old)}$": new for old, new in renamed.items()}
        if renaming:
            kwargs["key_mapping"] = {**renaming, **(kwargs.get("key_mapping") or {})}
        model, info = super().from_pretrained(
            *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
        if renaming:  # transformers would undo the mapping on save_pretrained: save under the current names
            model._weight_conversions = [
                conversion for conversion in getattr(model, "_weight_conversions", None) or []
                if not set(getattr(conversion, "source_patterns", ())) <= set(renaming)
            ]
        problems = {
            "missing": sorted(info["missing_keys"]) if strict else [],
            "unexpected": sorted(info["unexpected_keys"]) if strict else [],
            "wrong shape (checkpoint vs model)": [
                f"{key}: {tuple(checkpoint)} vs {tuple(expected)}"
                for key, checkpoint, expected in sorted(info["mismatched_keys"])
            ] if not ignore_mismatched_sizes else [],
        }
        details = "; ".join(f"{kind}: {keys}" for kind, keys in problems.items() if keys)
        if details:
            raise ValueError(
                f"The checkpoint does not match {cls.__name__} ({details}). Pass strict=False to load a partial "
                "checkpoint, ignore_mismatched_sizes=True to re-initialise wrongly shaped weights."
            )
        check_finite_tensors(model)
        model.check_loaded_state(require_hashes)
        return (model, info) if output_loading_info else model

    def check_loaded_state(self, require_hashes: bool = True) -> None:
        """Checks of a loaded checkpoint beyond shapes and finiteness (called by `from_pretrained`): a model
        overrides it for what only it knows (coordinates in range, hashes of stored bytes, which must be recorded
        unless `require_hashes=False`); none by default."""


__all__ = [
    "EARTH_MEAN_RADIUS_KM",
    "MICRODEGREES",
    "GeolocationOutput",
    "StrictFromPretrainedMixin",
    "check_top_k",
    "coordinate_rule_violations",
    "destination_points",
    "from_microdegrees",
    "to_microdegrees",
    "validate_locations",
]
