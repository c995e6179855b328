"""Answers people can trust: calibrated confidence within a distance, and "I can't tell" for unfamiliar inputs.

Two things are fitted on held-out data and stored in the model's config (so they ship with `save_pretrained`, the
Hub and `geoloc publish`); `geoloc.inference.Geolocator` reads them and fills `GeolocationResult.confidence`,
`unfamiliar` and `unfamiliarity`:

- **Confidence** (`config.geoloc_calibration`): for each radius r in `RADII_KM` (25, 200, 750, 2500 km), the
  probability that the true location lies within r of the best guess. The raw score is the model's own answer to
  that question: the probability mass of its candidates within r of its top-1 (GeoCLIP: gallery points; GeoHier:
  fine cells; the `CONFIDENCE_CANDIDATES` most probable ones). Raw masses are not frequencies (a tiny model's
  softmax says 98 % for a 1-pixel image), so each radius gets a monotone map fitted by isotonic regression
  (pool-adjacent-violators) of "the truth was within r" on the raw mass, over a validation split; it is stored as
  knots `(x, y)` and applied by linear interpolation. Across radii the confidences are made non-decreasing (a
  larger disc cannot be less likely).
- **Familiarity** (`config.geoloc_familiarity`): statistics of the image tower's embeddings on in-distribution
  images (the mean and spread over the patch tokens of the image tower's last hidden state, `tower_embedding`),
  clustered into `FAMILIARITY_CLUSTERS` groups by k-means, each group a Gaussian: its mean, leading principal
  directions with their variances and one shrunk variance for the rest (probabilistic PCA). An input's
  `unfamiliarity` is its Mahalanobis distance to the nearest group divided by sqrt(dimension); it is `unfamiliar` above a threshold set on held-out in-distribution images so that
  `FAMILIAR_QUANTILE` of them stay below it (at most a few percent flagged).

`geoloc calibrate MODEL --dataset DIR` fits both on a split (default `validation`) and writes them into the
model folder's config; with `--statistics-split train` the embedding statistics come from the training crops and
the held-out split only sets the threshold. The loaded sections are checked (`check_calibration`,
`check_familiarity`): sizes, knots in [0, 1] and monotone, finite numbers; a bad one fails the load of the
`Geolocator` with a `ValueError` naming the field.

Example:
    >>> import numpy as np
    >>> knots = isotonic_knots(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0.0, 1.0, 0.0, 1.0]))
    >>> knots["y"]
    [0.0, 0.5, 1.0]
"""

import json
import math
import os

import numpy as np
import torch

RADII_KM = (25, 200, 750, 2500)
CONFIDENCE_CANDIDATES = 3000  # most probable candidates whose mass near the top-1 is counted
CALIBRATION_KEY = "geoloc_calibration"
FAMILIARITY_KEY = "geoloc_familiarity"
FORMAT_VERSION = 1
MAX_KNOTS = 200  # isotonic knots kept per radius (thinned evenly beyond that)
FAMILIAR_QUANTILE = 0.97  # share of held-out in-distribution inputs left below the unfamiliarity threshold
MAX_COMPONENTS = 16  # principal directions kept per group in the familiarity statistics
FAMILIARITY_CLUSTERS = 8  # Gaussian groups of the familiarity statistics
ECE_BINS = 10
EARTH_RADIUS_KM = 6371.0088


# ------------------------------------------------------------------------------------------------ raw scores
def _haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distances (km) on the mean-radius sphere; broadcasts. (Geodesic accuracy is not needed here:
    the calibration map absorbs a 0.5 % difference in distance.)"""
    lat1, lon1, lat2, lon2 = (np.radians(np.asarray(x, dtype=np.float64)) for x in (lat1, lon1, lat2, lon2))
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0, 1)))


def mass_near_best(latitudes, longitudes, probabilities, radii_km=RADII_KM) -> np.ndarray:
    """The raw confidence: the probability mass of the candidates within each radius of the best one.

    Args:
        latitudes, longitudes, probabilities: `(B, C)` candidates, best first (`probabilities` a distribution's
            masses, e.g. `geolocate(..., top_k=C)`).

    Returns: `(B, len(radii_km))` masses in [0, 1], non-decreasing along the radii.

    Example:
        >>> mass_near_best([[0.0, 0.0, 10.0]], [[0.0, 1.0, 0.0]], [[0.5, 0.3, 0.2]], radii_km=(25, 200, 2500))
        array([[0.5, 0.8, 1. ]])
    """
    latitudes, longitudes, probabilities = (np.atleast_2d(np.asarray(x, dtype=np.float64))
                                            for x in (latitudes, longitudes, probabilities))
    distances = _haversine_km(latitudes[:, :1], longitudes[:, :1], latitudes, longitudes)
    masses = np.stack([(probabilities * (distances <= r)).sum(axis=1) for r in radii_km], axis=1)
    return np.clip(masses, 0.0, 1.0)


# ------------------------------------------------------------------------------------------------ isotonic fit
def isotonic_knots(scores, outcomes, max_knots: int = MAX_KNOTS) -> dict:
    """Fit a non-decreasing map from raw scores to the frequency of `outcomes` (0/1), by pool-adjacent-violators.

    Returns: `{"x": [...], "y": [...]}`: strictly increasing x (each block's mean score), non-decreasing y in
    [0, 1] (each block's frequency); `apply_knots` interpolates between them and holds the ends.
    """
    scores, outcomes = np.asarray(scores, dtype=np.float64), np.asarray(outcomes, dtype=np.float64)
    if scores.ndim != 1 or scores.shape != outcomes.shape or len(scores) < 2:
        raise ValueError(f"Need two 1-D arrays of the same length >= 2, got {scores.shape} and {outcomes.shape}.")
    if not (np.isfinite(scores).all() and np.isin(outcomes, (0, 1)).all()):
        raise ValueError("scores must be finite and outcomes 0 or 1.")
    order = np.argsort(scores, kind="stable")
    # blocks: [sum of outcomes, sum of scores, count]; merge while a block's mean is below its predecessor's
    values, xsum, weights = [], [], []
    for score, outcome in zip(scores[order].tolist(), outcomes[order].tolist()):
        values.append(outcome)
        xsum.append(score)
        weights.append(1.0)
        while len(values) > 1 and values[-2] / weights[-2] >= values[-1] / weights[-1]:
            for blocks in (values, xsum, weights):
                last = blocks.pop()
                blocks[-1] += last
    x = np.array(xsum) / np.array(weights)
    y = np.array(values) / np.array(weights)
    x, keep = np.unique(x, return_index=True)  # equal block means cannot happen after pooling, but stay safe
    y = np.maximum.accumulate(y[keep])
    if len(x) > max_knots:
        rows = np.unique(np.linspace(0, len(x) - 1, max_knots).round().astype(int))
        x, y = x[rows], y[rows]
    return {"x": [round(float(v), 6) for v in x], "y": [round(float(v), 6) for v in y]}


def apply_knots(knots: dict, scores) -> np.ndarray:
    """The calibrated probability of raw `scores` under one radius's knots (linear between knots, ends held)."""
    return np.interp(np.asarray(scores, dtype=np.float64), knots["x"], knots["y"])


def calibrated_confidence(calibration: dict, masses) -> np.ndarray:
    """`(B, R)` raw masses -> `(B, R)` calibrated confidences, non-decreasing along the radii."""
    masses = np.atleast_2d(np.asarray(masses, dtype=np.float64))
    columns = [apply_knots(knots, masses[:, i]) for i, knots in enumerate(calibration["maps"])]
    return np.maximum.accumulate(np.stack(columns, axis=1), axis=1)


def expected_calibration_error(confidences, outcomes, bins: int = ECE_BINS) -> float:
    """ECE: over `bins` equal-width confidence bins, the share-weighted |frequency - mean confidence|.

    Example:
        >>> expected_calibration_error([0.9, 0.9, 0.1, 0.1], [1, 1, 0, 1])
        0.3
    """
    confidences, outcomes = np.asarray(confidences, dtype=np.float64), np.asarray(outcomes, dtype=np.float64)
    if confidences.shape != outcomes.shape or confidences.ndim != 1 or len(confidences) == 0:
        raise ValueError("Need two non-empty 1-D arrays of the same length (confidences, outcomes).")
    rows = np.clip((confidences * bins).astype(int), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        inside = rows == b
        if inside.any():
            error += inside.mean() * abs(outcomes[inside].mean() - confidences[inside].mean())
    return round(float(error), 10)


def reliability_table(confidences, outcomes, bins: int = 5) -> list[dict]:
    """Rows `{"bin": "0.4-0.6", "n", "mean_confidence", "frequency"}` of the non-empty equal-width bins."""
    confidences, outcomes = np.asarray(confidences, dtype=np.float64), np.asarray(outcomes, dtype=np.float64)
    rows = np.clip((confidences * bins).astype(int), 0, bins - 1)
    table = []
    for b in range(bins):
        inside = rows == b
        if inside.any():
            table.append({"bin": f"{b / bins:.1f}-{(b + 1) / bins:.1f}", "n": int(inside.sum()),
                          "mean_confidence": round(float(confidences[inside].mean()), 4),
                          "frequency": round(float(outcomes[inside].mean()), 4)})
    return table


def fit_calibration(masses, distances_km, radii_km=RADII_KM) -> dict:
    """The `geoloc_calibration` section from raw masses `(N, R)` and the top-1 errors `(N,)` in km."""
    masses, distances = np.asarray(masses, dtype=np.float64), np.asarray(distances_km, dtype=np.float64)
    maps = [isotonic_knots(masses[:, i], distances <= r) for i, r in enumerate(radii_km)]
    return {"version": FORMAT_VERSION, "radii_km": [int(r) if float(r).is_integer() else float(r) for r in radii_km],
            "candidates": CONFIDENCE_CANDIDATES, "maps": maps, "n": int(len(distances))}


def check_calibration(section) -> dict:
    """Validate a `geoloc_calibration` config section (see the module docstring); returns it.

    Raises:
        ValueError: naming what is wrong (sizes, knots not monotone or outside [0, 1], not finite).
    """
    where = f"config.{CALIBRATION_KEY}"
    if not isinstance(section, dict):
        raise ValueError(f"{where} must be a dict, got {type(section).__name__}.")
    if section.get("version") != FORMAT_VERSION:
        raise ValueError(f"{where}.version must be {FORMAT_VERSION}, got {section.get('version')!r}.")
    radii, maps = section.get("radii_km"), section.get("maps")
    if not isinstance(radii, list) or not radii or not all(_positive(r) for r in radii) or radii != sorted(set(radii)):
        raise ValueError(f"{where}.radii_km must be increasing positive distances, got {radii!r}.")
    if not isinstance(maps, list) or len(maps) != len(radii):
        raise ValueError(f"{where}.maps must hold one map per radius ({len(radii)}), got "
                         f"{len(maps) if isinstance(maps, list) else type(maps).__name__}.")
    candidates = section.get("candidates")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"{where}.candidates must be a positive integer, got {candidates!r}.")
    for radius, knots in zip(radii, maps):
        name = f"{where}.maps (radius {radius} km)"
        if not isinstance(knots, dict) or not isinstance(knots.get("x"), list) or not isinstance(knots.get("y"), list):
            raise ValueError(f"{name} must be {{'x': [...], 'y': [...]}}.")
        x, y = knots["x"], knots["y"]
        if not 1 <= len(x) <= MAX_KNOTS or len(x) != len(y):
            raise ValueError(f"{name}: x and y must have the same length, 1 to {MAX_KNOTS}, got {len(x)} and {len(y)}.")
        if not all(_unit(v) for v in x + y):
            raise ValueError(f"{name}: every knot must be a finite number in [0, 1].")
        if any(b <= a for a, b in zip(x, x[1:])) or any(b < a for a, b in zip(y, y[1:])):
            raise ValueError(f"{name}: x must be strictly increasing and y non-decreasing (a monotone map).")
    return section


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _unit(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


# ------------------------------------------------------------------------------------------------ familiarity
def tower_embedding(model, pixel_values: torch.Tensor, num_crops: int = 1):
    """One pass of the model's image tower: `(inputs, embeddings)`, where `inputs` are the keyword arguments that
    let `model.geolocate` skip the tower (so each image is encoded once) and `embeddings` `(B, 2 * width)` float64
    numpy are what the familiarity statistics describe: the mean and the standard deviation over the patch tokens
    of the tower's last hidden state (the spread separates blank and 1-pixel images from textured ones; the mean,
    noise and photographs from map crops). `(None, None)` for a model without a known tower.

    GeoCLIP: the CLIP image tower (its projected embedding goes on as `clip_image_embeds`). GeoHier: the backbone
    (its tokens go on as `backbone_hidden_states`); with `num_crops`, each image's crops are averaged.
    """
    kind = embedding_kind(model)
    if kind is None:
        return None, None
    if hasattr(model, "get_clip_image_embeds"):
        tower = model.image_tower
        output = tower(pixel_values=pixel_values.to(tower.visual_projection.weight.dtype))
        inputs, hidden = {"clip_image_embeds": output.image_embeds}, output.last_hidden_state
    else:
        hidden = model.get_backbone_hidden_states(pixel_values)
        inputs = {"backbone_hidden_states": hidden}
    patches = hidden[:, 1:].double()
    features = torch.cat([patches.mean(dim=1), patches.std(dim=1)], dim=1).cpu()
    if num_crops > 1:
        features = features.unflatten(0, (-1, num_crops)).mean(dim=1)
    return inputs, features.numpy()


def embedding_kind(model) -> str | None:
    """What `tower_embedding` describes for this model (stored with the statistics and checked on load)."""
    if hasattr(model, "get_clip_image_embeds") and hasattr(model, "image_tower"):
        return "image_tower_patch_mean_std"
    if hasattr(model, "get_backbone_hidden_states"):
        return "backbone_patch_mean_std"
    return None


def _kmeans(points: np.ndarray, k: int, iterations: int = 50) -> np.ndarray:
    """Cluster labels of standardised points by Lloyd's k-means from k-means++ seeds (seeded: reproducible)."""
    rng = np.random.default_rng(0)
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        distances = np.min([((points - c) ** 2).sum(axis=1) for c in centres], axis=0)
        centres.append(points[rng.choice(len(points), p=distances / distances.sum())] if distances.sum() > 0
                       else points[rng.integers(len(points))])
    centres = np.stack(centres)
    for _ in range(iterations):
        labels = ((points[:, None] - centres[None]) ** 2).sum(axis=-1).argmin(axis=1)
        centres = np.stack([points[labels == c].mean(axis=0) if (labels == c).any() else centres[c] for c in range(k)])
    return labels


def _ppca(embeddings: np.ndarray, max_components: int) -> dict:
    n, dim = embeddings.shape
    mean = embeddings.mean(axis=0)
    _, singular, directions = np.linalg.svd(embeddings - mean, full_matrices=False)
    variances = singular**2 / (n - 1)
    k = int(min(max_components, dim - 1, max(1, n // 4)))
    rest = variances[k:]
    residual = float(rest.sum() / max(dim - k, 1)) if len(rest) else 0.0
    residual = max(residual, 1e-6 * float(variances[0]), 1e-12)
    return {"mean": _rounded(mean), "components": [_rounded(row) for row in directions[:k]],
            "variances": _rounded(np.maximum(variances[:k], residual)), "residual_variance": float(f"{residual:.7g}"),
            "n": int(n)}


def fit_familiarity(embeddings, kind: str, clusters: int = FAMILIARITY_CLUSTERS,
                    max_components: int = MAX_COMPONENTS) -> dict:
    """Statistics of in-distribution embeddings `(N, D)`: k-means into `clusters` groups (standardised space),
    then per group a probabilistic-PCA Gaussian (mean, leading directions and variances, one shrunk variance for
    the rest). A tight group (e.g. open-ocean crops) keeps its own narrow covariance, so a blank image of some
    other colour is not excused by the spread of the whole set. No threshold yet (`set_threshold`)."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    n, dim = embeddings.shape
    if n < 4 * clusters:
        raise ValueError(f"Familiarity statistics need at least {4 * clusters} in-distribution images, got {n}.")
    scale = embeddings.std(axis=0) + 1e-12
    labels = _kmeans((embeddings - embeddings.mean(axis=0)) / scale, clusters)
    groups = [_ppca(embeddings[labels == c], max_components) for c in range(clusters) if (labels == c).sum() >= 4]
    return {"version": FORMAT_VERSION, "embedding": kind, "dim": int(dim), "clusters": groups, "n": int(n)}


def _rounded(values) -> list[float]:
    return [float(f"{v:.7g}") for v in np.asarray(values).tolist()]


def unfamiliarity_scores(statistics: dict, embeddings) -> np.ndarray:
    """`(B,)` unfamiliarity: the Mahalanobis distance to the nearest group's Gaussian, / sqrt(D)."""
    embeddings = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
    scores = []
    for group in statistics["clusters"]:
        centred = embeddings - np.asarray(group["mean"])
        components = np.asarray(group["components"]).reshape(-1, centred.shape[1])
        projected = centred @ components.T
        inside = (projected**2 / np.asarray(group["variances"])).sum(axis=1)
        outside = np.maximum((centred**2).sum(axis=1) - (projected**2).sum(axis=1), 0.0)
        scores.append(np.sqrt((inside + outside / group["residual_variance"]) / centred.shape[1]))
    return np.min(scores, axis=0)


def set_threshold(statistics: dict, held_out_embeddings, quantile: float = FAMILIAR_QUANTILE) -> dict:
    """Add the threshold: the `quantile` of held-out in-distribution inputs' scores (they stay familiar)."""
    scores = unfamiliarity_scores(statistics, held_out_embeddings)
    return {**statistics, "threshold": float(f"{np.quantile(scores, quantile):.7g}"), "quantile": quantile,
            "n_threshold": int(len(scores))}


def check_familiarity(section, model=None) -> dict:
    """Validate a `geoloc_familiarity` config section (sizes against the model's tower, finite, variances > 0).

    Raises:
        ValueError: naming the field.
    """
    where = f"config.{FAMILIARITY_KEY}"
    if not isinstance(section, dict):
        raise ValueError(f"{where} must be a dict, got {type(section).__name__}.")
    if section.get("version") != FORMAT_VERSION:
        raise ValueError(f"{where}.version must be {FORMAT_VERSION}, got {section.get('version')!r}.")
    kind = embedding_kind(model) if model is not None else section.get("embedding")
    if section.get("embedding") != kind:
        raise ValueError(f"{where}.embedding is {section.get('embedding')!r} but this model's tower gives {kind!r}.")
    dim = section.get("dim")
    expected = _tower_dim(model) if model is not None else dim
    if isinstance(dim, bool) or not isinstance(dim, int) or dim != expected or dim < 2:
        raise ValueError(f"{where}.dim must be the tower's embedding size {expected}, got {dim!r}.")
    groups = section.get("clusters")
    if not isinstance(groups, list) or not 1 <= len(groups) <= 64:
        raise ValueError(f"{where}.clusters must be a list of 1 to 64 groups.")
    for index, group in enumerate(groups):
        name = f"{where}.clusters[{index}]"
        if not isinstance(group, dict):
            raise ValueError(f"{name} must be a dict.")
        mean, components, variances = group.get("mean"), group.get("components"), group.get("variances")
        if not isinstance(mean, list) or len(mean) != dim:
            raise ValueError(f"{name}.mean must hold {dim} numbers.")
        if not isinstance(components, list) or not 1 <= len(components) < dim or any(
                not isinstance(row, list) or len(row) != dim for row in components):
            raise ValueError(f"{name}.components must be 1 to {dim - 1} rows of {dim} numbers.")
        if not isinstance(variances, list) or len(variances) != len(components):
            raise ValueError(f"{name}.variances must hold one variance per component ({len(components)}).")
        numbers = mean + [v for row in components for v in row] + variances + [group.get("residual_variance")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
            raise ValueError(f"{name}: mean, components, variances and residual_variance must be finite numbers.")
        if min(variances) <= 0 or group["residual_variance"] <= 0:
            raise ValueError(f"{name}: variances and residual_variance must be > 0.")
    threshold = section.get("threshold")
    if not _positive(threshold):
        raise ValueError(f"{where}.threshold must be a finite number > 0, got {threshold!r}.")
    return section


def _tower_dim(model) -> int | None:
    return 2 * int(model.config.vision_config.hidden_size) if embedding_kind(model) else None


def load_sections(model) -> tuple[dict | None, dict | None]:
    """The model's checked `(calibration, familiarity)` config sections, each None when absent."""
    calibration = getattr(model.config, CALIBRATION_KEY, None)
    familiarity = getattr(model.config, FAMILIARITY_KEY, None)
    return (None if calibration is None else check_calibration(calibration),
            None if familiarity is None else check_familiarity(familiarity, model))


__all__ = [
    "CALIBRATION_KEY", "CONFIDENCE_CANDIDATES", "FAMILIARITY_KEY", "RADII_KM", "apply_knots", "calibrated_confidence",
    "check_calibration", "check_familiarity", "expected_calibration_error", "fit_calibration", "fit_familiarity",
    "isotonic_knots", "load_sections", "mass_near_best", "reliability_table", "set_threshold", "tower_embedding",
    "unfamiliarity_scores",
]


# ------------------------------------------------------------------------------------------------ model card
def card_section(config) -> str:
    """Markdown for the model card: how the confidence was calibrated, its held-out ECE and reliability table per
    radius, and the unfamiliar-input threshold with its held-out flag rate ("" for a model without either)."""
    calibration, familiarity = getattr(config, CALIBRATION_KEY, None), getattr(config, FAMILIARITY_KEY, None)
    if not calibration and not familiarity:
        return ""
    lines = ["", "## Confidence and unfamiliar inputs", ""]
    if calibration:
        lines.append(f"Each answer's `confidence` (with the `geoloc` package: `GeolocationResult.confidence`) is the "
                     f"probability that the true location lies within 25 / 200 / 750 / 2,500 km of the best guess: the "
                     f"model's probability mass within that distance of its top-1, mapped by an isotonic fit per radius "
                     f"on {calibration['n']:,} images of split `{calibration.get('split', '?')}` "
                     f"(`geoloc calibrate`).")
        held_out = calibration.get("held_out")
        if held_out:
            lines += ["", f"Reliability on split `{held_out['split']}` ({held_out['n']:,} images not used for fitting):",
                      "", "| radius | ECE | accuracy | mean confidence | confidence bin: mean confidence → frequency (n) |",
                      "|---|---|---|---|---|"]
            for radius in calibration["radii_km"]:
                row = held_out.get(f"{radius}km")
                if isinstance(row, dict):
                    bins = "; ".join(f"{b['bin']}: {b['mean_confidence']:.2f} → {b['frequency']:.2f} ({b['n']})"
                                     for b in row["reliability"])
                    lines.append(f"| {radius:,} km | {row['ece']:.3f} | {row['accuracy']:.1%} | "
                                 f"{row['mean_confidence']:.1%} | {bins} |")
        else:
            lines += ["", "No held-out split was given to `geoloc calibrate --test-split`: the ECE is not measured."]
    if familiarity:
        rate = familiarity.get("held_out_flag_rate")
        measured = f"; on split `{rate['split']}` it flags {rate['rate']:.1%} of in-distribution images" if rate else ""
        lines += ["", f"An image whose embedding lies far from the training distribution ({len(familiarity['clusters'])} "
                      f"Gaussian groups of the image tower's patch statistics) is answered as `unfamiliar`: the threshold "
                      f"leaves {familiarity.get('quantile', FAMILIAR_QUANTILE):.0%} of split "
                      f"`{familiarity.get('threshold_split', '?')}` below it{measured}."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ fitting
def collect(model, image_processor, dataset, batch_size: int = 64, candidates: int = CONFIDENCE_CANDIDATES,
            radii_km=RADII_KM):
    """Run a model over rows with `image`, `latitude`, `longitude`: `(masses (N, R), errors_km (N,), embeddings
    (N, D) or None, unreadable)`, the raw material of `fit_calibration`, `fit_familiarity` and the held-out checks.
    Unreadable images are skipped and counted."""
    from ..data.dataset import decode_images, image_limits

    candidates = min(candidates, model.num_candidates)
    masses, errors, embeddings, unreadable = [], [], [], 0
    limits = image_limits(image_processor)
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        images, kept, failed = decode_images(rows["image"], **limits)
        unreadable += len(failed)
        if not images:
            continue
        pixel_values = image_processor(images, return_tensors="pt").pixel_values
        pixel_values = pixel_values.to(device=model.device, dtype=model.dtype)
        with torch.no_grad():
            inputs, features = tower_embedding(model, pixel_values)
            output = model.geolocate(**(inputs or {"pixel_values": pixel_values}), top_k=candidates)
        latitudes, longitudes, probabilities = (x.double().cpu().numpy() for x in
                                                (output.latitudes, output.longitudes, output.probabilities))
        masses.append(mass_near_best(latitudes, longitudes, probabilities, radii_km))
        true_lat = np.asarray(rows["latitude"], dtype=np.float64)[kept]
        true_lon = np.asarray(rows["longitude"], dtype=np.float64)[kept]
        errors.append(_haversine_km(true_lat, true_lon, latitudes[:, 0], longitudes[:, 0]))
        if features is not None:
            embeddings.append(features)
    if not masses:
        raise ValueError(f"No image of the {len(dataset)} rows could be read: nothing to calibrate on.")
    return (np.concatenate(masses), np.concatenate(errors), np.concatenate(embeddings) if embeddings else None,
            unreadable)


def held_out_report(calibration: dict, masses, errors_km) -> dict:
    """ECE and reliability table per radius of a calibration on rows it was not fitted on."""
    confidences = calibrated_confidence(calibration, masses)
    report = {}
    for i, radius in enumerate(calibration["radii_km"]):
        hits = np.asarray(errors_km) <= radius
        report[f"{radius}km"] = {"ece": round(expected_calibration_error(confidences[:, i], hits), 4),
                                 "accuracy": round(float(hits.mean()), 4),
                                 "mean_confidence": round(float(confidences[:, i].mean()), 4),
                                 "reliability": reliability_table(confidences[:, i], hits)}
    return report


def config_text(config: dict) -> str:
    """A config dict as `config.json` text: indented like transformers writes it, but the two (long, numeric)
    calibration sections each on one line."""
    sections = [key for key in (CALIBRATION_KEY, FAMILIARITY_KEY) if config.get(key) is not None]
    text = json.dumps({k: v for k, v in config.items() if k not in sections}, indent=2, sort_keys=True)
    lines = [f'  "{key}": {json.dumps(config[key], separators=(",", ":"), sort_keys=True)}' for key in sections]
    if lines:
        text = text.rstrip()[:-1].rstrip() + ",\n" + ",\n".join(lines) + "\n}"
    return text + "\n"


def build_parser():
    import argparse

    from ..cli import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="geoloc calibrate",
        description="Fit a checkpoint's calibrated confidence (25/200/750/2500 km) and its unfamiliar-input statistics "
                    "on a held-out split, and store them in its config.json.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model", help="checkpoint folder (updated in place) or Hub id (needs --output-dir)")
    parser.add_argument("--dataset", required=True, help="image folder with metadata.csv, shards or a Hub dataset id")
    parser.add_argument("--split", default="validation",
                        help="held-out split the confidence maps and the unfamiliarity threshold are fitted on")
    parser.add_argument("--statistics-split", default=None,
                        help="split whose embeddings give the familiarity statistics, e.g. train (default: half of "
                             "--split, the other half sets the threshold)")
    parser.add_argument("--test-split", default=None,
                        help="a split used for nothing else: its ECE, reliability and flag rate are stored for the "
                             "model card")
    parser.add_argument("--output-dir", default=None,
                        help="save the calibrated model here instead of updating MODEL's config.json")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--max-samples", type=int, default=None, help="use only the first N rows of each split")
    parser.add_argument("--image-column", default="image", help="image column of the dataset")
    parser.add_argument("--lat-column", default="latitude", help="latitude column of the dataset")
    parser.add_argument("--lon-column", default="longitude", help="longitude column of the dataset")
    return parser


def main(argv=None) -> int:
    """Run `geoloc calibrate` (the dispatcher turns a raised ValueError into one line on stderr, exit 1)."""
    from transformers import AutoImageProcessor, AutoModel

    from ..cli import check_minimums
    from ..data.dataset import load_geo_dataset
    from .adapter import resolve_model
    from ..models import register_models
    from ..sources import check_local_or_hub

    parser = build_parser()
    args = parser.parse_args(argv)
    check_minimums(parser, args, batch_size=1, max_samples=4)
    source = resolve_model(args.model)
    if not os.path.isdir(source) and args.output_dir is None:
        raise ValueError(f"--model {args.model} is not a local folder: pass --output-dir to save the calibrated copy.")
    check_local_or_hub(args.dataset, "--dataset", patterns=True)
    register_models()
    # not through Geolocator: a checkpoint whose stored calibration is invalid can still be recalibrated
    model = AutoModel.from_pretrained(source, trust_remote_code=False).eval()
    image_processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=False)

    def rows(split):
        dataset = load_geo_dataset(args.dataset, split=split, image_column=args.image_column,
                                   lat_column=args.lat_column, lon_column=args.lon_column)
        if args.max_samples is not None:
            dataset = dataset.select(range(min(args.max_samples, len(dataset))))
        return collect(model, image_processor, dataset, args.batch_size)

    masses, errors, embeddings, unreadable = rows(args.split)
    if len(errors) < 20:
        raise ValueError(f"Split {args.split!r} has {len(errors)} readable images: calibrating needs at least 20.")
    calibration = {**fit_calibration(masses, errors), "split": args.split}
    familiarity = None if embeddings is None else _fit_familiarity_for(args, model, embeddings, rows)
    summary = {"split": args.split, "n": len(errors), "unreadable": unreadable}
    if args.test_split is not None:
        summary.update(_held_out(args.test_split, rows, calibration, familiarity))
    check_calibration(calibration)
    if familiarity is not None:
        check_familiarity(familiarity, model)
    where = _save_calibrated(args, source, model, image_processor, calibration, familiarity)
    print(json.dumps(summary))
    print(f"geoloc calibrate: fitted on {len(errors)} images of split {args.split!r} -> {where}")
    return 0


def _fit_familiarity_for(args, model, embeddings, rows) -> dict:
    """The familiarity statistics: from `--statistics-split` (threshold on the calibration split), or from the
    calibration split's even rows with the threshold set on its odd rows."""
    kind = embedding_kind(model)
    if args.statistics_split is not None:
        familiarity = set_threshold(fit_familiarity(rows(args.statistics_split)[2], kind), embeddings)
        familiarity["statistics_split"] = args.statistics_split
    else:
        familiarity = set_threshold(fit_familiarity(embeddings[0::2], kind), embeddings[1::2])
        familiarity["statistics_split"] = f"{args.split} (even rows; odd rows set the threshold)"
    familiarity["threshold_split"] = args.split
    return familiarity


def _held_out(split: str, rows, calibration: dict, familiarity: dict | None) -> dict:
    """Measure the fitted calibration (and flag rate) on `split`: recorded in `calibration` / `familiarity`,
    and returned as the summary's `held_out` entries."""
    test_masses, test_errors, test_embeddings, _ = rows(split)
    calibration["held_out"] = {"split": split, "n": int(len(test_errors)),
                               **held_out_report(calibration, test_masses, test_errors)}
    summary = {"held_out": {key: value["ece"] for key, value in calibration["held_out"].items()
                            if isinstance(value, dict)}}
    if familiarity is not None:
        rate = float(np.mean(unfamiliarity_scores(familiarity, test_embeddings) > familiarity["threshold"]))
        familiarity["held_out_flag_rate"] = {"split": split, "rate": round(rate, 4)}
        summary["held_out_flag_rate"] = round(rate, 4)
    return summary


def _save_calibrated(args, source: str, model, image_processor, calibration: dict, familiarity: dict | None) -> str:
    """Write the calibration into a copy (`--output-dir`) or into the folder's own config.json; returns where."""
    from transformers import AutoTokenizer

    setattr(model.config, CALIBRATION_KEY, calibration)
    setattr(model.config, FAMILIARITY_KEY, familiarity)
    if args.output_dir is not None:
        model.save_pretrained(args.output_dir)
        image_processor.save_pretrained(args.output_dir)
        if getattr(model, "supports_text_queries", False):
            AutoTokenizer.from_pretrained(source, trust_remote_code=False).save_pretrained(args.output_dir)
        return args.output_dir
    path = os.path.join(source, "config.json")
    with open(path) as handle:
        config = json.load(handle)
    config[CALIBRATION_KEY] = calibration
    if familiarity is not None:
        config[FAMILIARITY_KEY] = familiarity
    with open(path, "w") as handle:
        handle.write(config_text(config))
    return path

if __name__ == "__main__":
    from ..cli import run_command

    run_command("calibrate")
