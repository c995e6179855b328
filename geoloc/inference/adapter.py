"""The one inference path: images or texts in, `GeolocationResult`s out, whatever the model.

`geoloc predict`, `geoloc evaluate`, the `image-geolocation` pipeline (`geoloc.pipeline`) and the Space all go
through `Geolocator`. It never inspects signatures: what a model can do is what its class declares
(`supports_text_queries`, `predicts_scenes`, `returns_attention_maps`, `candidate_kind`, `num_candidates`,
`candidate_ids`),
gathered in `Geolocator.capabilities`.

Contract (these names are kept stable):

- `Geolocator.from_pretrained(source, *, device=None, dtype=None, tower="fp32")`: a GeoCLIP or GeoHier
  checkpoint (folder, Hub id, `geoloc.DEFAULT_MODEL` or "default") with the image processor and, for models that
  read text, the tokenizer saved next to it; `tower="bf16"|"int8"` runs GeoCLIP's image tower in reduced
  precision (`geoloc.inference.tower_speed.apply_tower`). `Geolocator(model, image_processor, tokenizer=None, name=None)` wraps objects
  already in memory.
- Attributes: `model`, `image_processor`, `tokenizer` (None when the model reads no text; loaded on first
  use), `name` (what it was loaded from), `capabilities`: a frozen `Capabilities(text, scenes, attention, uncertainty,
  text_aligned)`: `text`: `locate_texts` works; `text_aligned`: its answers mean something (the text tower is aligned
  with the image tower; front ends offer text only then); `scenes`: results carry scene probabilities (only for models trained with
  scene labels); `attention`: results can carry attention maps; `uncertainty`: what the candidates behind
  `GeolocationResult.uncertainty` are: "gallery" (GeoCLIP: points of a replaceable GPS gallery), "cells"
  (GeoHier: fine geocells at their centroids) or None.
- `locate_images(images, top_k=5, *, places=False, extras=False, names=None, batch_size=32)`: images are file
  paths, bytes, PIL images, numpy arrays or dataset image cells (`{"bytes", "path"}`); decoded one batch at a
  time. `locate_texts(texts, top_k=5, *, places=False, extras=False, batch_size=32)`. Both return one
  `GeolocationResult` per input, in order. An input that cannot be read (a broken file, empty text, text over
  the model's token window) gives a result with `error` set and never stops the batch; a bad `top_k`, or text
  for a model that reads none, raises `ValueError`. `places=True` adds the nearest populated place of each
  prediction (`geoloc.geography.places`: country or sea by point-in-polygon over Natural Earth, nearest GeoNames
  town); `extras=True` adds what the model declares:
  scenes, attention maps (images only) and uncertainty points.
- `locate_pixel_values(pixel_values, top_k=5, *, extras=False, names=None)`: the same for processed pixels
  `(B, 3, H, W)` (what the pipeline calls).
- `GeolocationResult`: `input` (a display name), `latitudes`, `longitudes`, `probabilities` (`np.ndarray`
  `(k,)`, best first; probabilities are masses of a distribution over the model's candidates), `places`
  (`[{"name", "area", "water", "country", "place", "place_country", "km"}]` or None, see
  `geoloc.geography.places.describe_places`), `scenes` (`{name: p}` or None), `attention` (`[AttentionMap]` per
  hierarchy level, coarse to fine, or None), `uncertainty` (`(N, 3)` (latitude, longitude, probability) of the
  N most probable candidates, or None), `error` (str or None), `confidence` (`{25: p, 200: p, 750: p, 2500: p}`:
  the calibrated probability that the true place lies within that many km of the best guess, or None for a model
  without a calibration; `headline_confidence` picks the radius to show), `unfamiliar` (bool: the image lies far
  from the training distribution) and `unfamiliarity` (its score), None for texts and uncalibrated models (both
  from `geoloc.inference.calibration`, fitted by `geoloc calibrate`), `candidate_ids` (the model's id of each
  answer: GeoCLIP's gallery row, GeoHier's fine-cell S2 token), `uncertainty_ids` (the same for the uncertainty
  points), and `to_dict()` (JSON-safe: no NaN, no arrays).

Example:
    >>> from geoloc import DEFAULT_MODEL, Geolocator
    >>> geolocator = Geolocator.from_pretrained(DEFAULT_MODEL)
    >>> geolocator.capabilities
    Capabilities(text=True, scenes=False, attention=False, uncertainty='gallery', text_aligned=False)
    >>> [result] = geolocator.locate_texts(["hot sand dunes"], top_k=3)
    >>> result.latitudes.shape, result.error
    ((3,), None)
"""

import collections
import math
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from geo_core import check_top_k

from .. import DEFAULT_MODEL
from ..data.dataset import decode_images, image_limits
from ..geography.geodesy import geodesic_distance_km
from ..models import register_models
from ..sources import check_local_or_hub
from .calibration import calibrated_confidence, load_sections, mass_near_best, tower_embedding, unfamiliarity_scores

UNCERTAINTY_POINTS = 3000  # candidates returned as uncertainty points at most (GeoCLIP's heat layer)
ATTENTION_SIZE = 224  # side in pixels of the attention overlays
DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class Capabilities:
    """What a model can do, as its class declares it (see the module docstring)."""

    text: bool
    scenes: bool
    attention: bool
    uncertainty: str | None
    text_aligned: bool = True  # text queries mean something (False: a text tower that was never aligned)

    @classmethod
    def of(cls, model) -> "Capabilities":
        """Read the declarations of a GeoCLIP or GeoHier model (or any model class that makes them)."""
        try:
            if not callable(model.candidate_ids):
                raise AttributeError("candidate_ids is not a method")
            return cls(
                text=bool(model.supports_text_queries),
                scenes=bool(model.predicts_scenes),
                attention=bool(model.returns_attention_maps),
                uncertainty=model.candidate_kind,
                text_aligned=bool(model.supports_text_queries and getattr(model, "text_aligned", True)),
            )
        except AttributeError as error:
            raise ValueError(
                f"{type(model).__name__} does not declare its geolocation capabilities ({error}); models need "
                "supports_text_queries, predicts_scenes, returns_attention_maps, candidate_kind, num_candidates, "
                "candidate_ids."
            ) from None


@dataclass
class AttentionMap:
    """Where the model looked at one hierarchy level.

    Args:
        caption (`str`): e.g. "level 1 of 3 (coarsest)".
        weights (`np.ndarray` of shape `(side, side)`): the last decoder layer's cross-attention of the predicted
            scene's query at this level over the image patches (mean over heads), min-max scaled to [0, 1].
        overlay (`PIL.Image.Image`): the image the model saw (224 x 224) with the weights drawn over it in red.
    """

    caption: str
    weights: np.ndarray
    overlay: Image.Image


@dataclass
class GeolocationResult:
    """One input's answer (see the module docstring for every field)."""

    input: str
    latitudes: np.ndarray
    longitudes: np.ndarray
    probabilities: np.ndarray
    places: list[dict] | None = None
    scenes: dict[str, float] | None = None
    attention: list[AttentionMap] | None = None
    uncertainty: np.ndarray | None = None
    error: str | None = None
    candidate_ids: list | None = None
    uncertainty_ids: list | None = None
    confidence: dict[int, float] | None = None
    unfamiliar: bool | None = None
    unfamiliarity: float | None = None

    @property
    def headline_confidence(self) -> tuple[int, float] | None:
        """The one number to show with the best guess: `(radius_km, probability)` for the smallest radius at which
        the calibrated confidence reaches 50 %, else the largest radius; None without a calibration."""
        if not self.confidence:
            return None
        for radius, probability in self.confidence.items():
            if probability >= 0.5:
                return radius, probability
        return radius, probability

    @classmethod
    def failed(cls, name: str, error: str) -> "GeolocationResult":
        """The result of an input that could not be read: no predictions, `error` set."""
        empty = np.zeros(0)
        return cls(input=name, latitudes=empty, longitudes=empty, probabilities=empty, error=error)

    def to_dict(self) -> dict:
        """A JSON-safe dict: `input`, `error`, `predictions` (rank order: `latitude`, `longitude`, `probability`
        and with places `name`, `area`, `water`, `place`, `country`, `km`), and `scenes`, `uncertainty` (`[[lat, lon, p], ...]`),
        `attention` (`[{"caption", "weights"}]`) when present. Non-finite numbers become None."""
        predictions = [
            {"latitude": _number(lat), "longitude": _number(lon), "probability": _number(p)}
            for lat, lon, p in zip(self.latitudes.tolist(), self.longitudes.tolist(), self.probabilities.tolist())
        ]
        for prediction, candidate in zip(predictions, self.candidate_ids or []):
            prediction["candidate"] = candidate
        for prediction, place in zip(predictions, self.places or []):
            prediction.update(name=place["name"], area=place["area"], water=place["water"], place=place["place"],
                              country=place["country"], km=_number(place["km"]))
        answer = {"input": self.input, "error": self.error, "predictions": predictions}
        if self.confidence is not None:
            answer["confidence"] = [{"radius_km": r, "probability": _number(p)} for r, p in self.confidence.items()]
        if self.unfamiliar is not None:
            answer.update(unfamiliar=self.unfamiliar, unfamiliarity=_number(self.unfamiliarity))
        if self.scenes is not None:
            answer["scenes"] = {name: _number(p) for name, p in self.scenes.items()}
        if self.uncertainty is not None:
            answer["uncertainty"] = [[_number(x) for x in row] for row in self.uncertainty.tolist()]
            answer["uncertainty_ids"] = self.uncertainty_ids
        if self.attention is not None:
            answer["attention"] = [
                {"caption": m.caption, "weights": [[_number(x) for x in row] for row in m.weights.tolist()]}
                for m in self.attention
            ]
        return answer


def _number(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def resolve_model(source: str | os.PathLike) -> str:
    """A checkpoint source as `from_pretrained` takes it: "default" becomes `geoloc.DEFAULT_MODEL`; anything that is
    not a valid Hub id must exist locally (`geoloc.sources.check_local_or_hub`: "no such folder", no Hub lookup)."""
    source = os.fspath(source)
    if source == "default":
        source = DEFAULT_MODEL
    if source == DEFAULT_MODEL and not os.path.isdir(source):
        raise ValueError(f"Model folder '{source}' does not exist (the bundled default model is not installed): "
                         "pass a checkpoint folder or a Hub id.")
    return check_local_or_hub(source, "--model")


class Geolocator:
    """A geolocation model with its image processor and tokenizer, answering in `GeolocationResult`s."""

    def __init__(self, model, image_processor, tokenizer=None, name: str | None = None):
        self.model = model.eval()
        self.image_processor = image_processor
        self.capabilities = Capabilities.of(model)
        self._tokenizer = tokenizer if self.capabilities.text else None
        self._tokenizer_source = None  # where `from_pretrained` loads the tokenizer from, on first use
        self.name = name or type(model).__name__
        # fitted by `geoloc calibrate` and stored in the config; checked here (ValueError naming the field)
        self.calibration, self.familiarity = load_sections(model)

    @property
    def tokenizer(self):
        """The tokenizer (None when the model reads no text). `from_pretrained` loads it on first use, so
        image-only work needs no tokenizer files."""
        if self._tokenizer is None and self._tokenizer_source is not None:
            self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_source, trust_remote_code=False)
        return self._tokenizer

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *, device=None, dtype=None,
                        tower: str = "fp32") -> "Geolocator":
        """Load a checkpoint (folder, Hub id, `geoloc.DEFAULT_MODEL` or "default") with its processors.

        Args:
            device: where the model runs (`torch.device` or str; default: where transformers loads it, the CPU).
            dtype: the model's weights dtype (default: the checkpoint's).
            tower (`str`): GeoCLIP's image tower precision: "fp32" (default, as loaded), "bf16" (CPUs with
                AVX512-BF16 / AMX, GPUs) or "int8" (dynamic int8 quantisation, CPU); the location encoder and the
                gallery stay float32. See `geoloc.inference.tower_speed` and `benchmarks/bench_geoclip_predict.py` for speed
                and how often the top-5 answers agree with fp32's.

        Raises:
            ValueError: a bad `tower`, or one this model or machine cannot run (see `apply_tower`).
        """
        from .tower_speed import TOWER_CHOICES, apply_tower

        if tower not in TOWER_CHOICES:  # before loading anything
            raise ValueError(f"tower must be one of {', '.join(TOWER_CHOICES)}, got {tower!r}.")
        register_models()
        source = resolve_model(source)
        # trust_remote_code=False: a folder whose config names code of its own is refused, never prompted for
        options = {"trust_remote_code": False, **({} if dtype is None else {"dtype": dtype})}
        model = AutoModel.from_pretrained(source, **options)
        if device is not None:
            model = model.to(device)
        apply_tower(model, tower)
        geolocator = cls(model, AutoImageProcessor.from_pretrained(source, trust_remote_code=False), name=source)
        if geolocator.capabilities.text:
            geolocator._tokenizer_source = source
        return geolocator

    # --------------------------------------------------------------------------------------------- inputs
    def locate_images(self, images: Iterable, top_k: int = 5, *, places: bool = False, extras: bool = False,
                      names: Sequence[str] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                      ten_crop: bool = False, decode_workers: int = 0) -> list[GeolocationResult]:
        """Geolocate images (see the module docstring); one result per image, in order. With `ten_crop` (GeoHier),
        each image is answered from the average of its ten crops (`GeoHierImageProcessor.ten_crop`). With
        `decode_workers` > 0, batches are decoded and processed ahead on that many threads while the model runs
        (the same answers; `geoloc predict --dataset` and `geoloc evaluate` use it)."""
        images = list(images)
        names = [_image_name(image, i) for i, image in enumerate(images)] if names is None else list(names)
        if len(names) != len(images):
            raise ValueError(f"names has {len(names)} entries for {len(images)} images: give one per image.")
        self._check_top_k(top_k)
        if ten_crop and (extras or not getattr(self.model, "supports_ten_crop", False)):
            asked = " and extras were asked" if extras else ""
            raise ValueError(f"Ten-crop evaluation is GeoHier's (GeoGuessNet's TenCrop), without extras; "
                             f"{self.name} is a {type(self.model).__name__}{asked}.")
        results = []
        for start, prepared in self._prepared_batches(images, _check_batch_size(batch_size), ten_crop, decode_workers):
            pixel_values, kept, errors = prepared
            batch = [None] * (len(kept) + len(errors))
            for position, error in errors:
                batch[position] = GeolocationResult.failed(names[start + position], error)
            if kept:
                located = self._locate_processed(pixel_values, [names[start + position] for position in kept], top_k,
                                                 extras, ten_crop)
                for position, result in zip(kept, located):
                    batch[position] = result
            results += batch
        return self._with_places(results) if places else results

    def _prepared_batches(self, images: list, batch_size: int, ten_crop: bool, workers: int):
        """`(start, (pixel_values, kept, errors))` per batch of `batch_size` images, in order. With `workers` > 0
        the next batches are decoded and processed on that many threads (Pillow and the resize release the GIL)
        while the caller runs the model on this one; at most `workers + 1` batches are held at once."""
        starts = range(0, len(images), batch_size)
        prepare = lambda start: self._prepare(images[start : start + batch_size], ten_crop)  # noqa: E731
        if workers < 1 or len(starts) < 2:
            yield from ((start, prepare(start)) for start in starts)
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="geoloc-decode") as pool:
            pending = collections.deque()
            for start in starts:
                pending.append((start, pool.submit(prepare, start)))
                if len(pending) > workers:
                    first, future = pending.popleft()
                    yield first, future.result()
            while pending:
                first, future = pending.popleft()
                yield first, future.result()

    def _prepare(self, images: list, ten_crop: bool):
        """Decode a batch once, with the processor's own pixel and resize limits (it re-checks, never re-decodes),
        and process the readable images: `(pixel_values or None, kept positions, [(position, error)])`."""
        decoded, kept, errors = decode_images(images, **image_limits(self.image_processor))
        if not decoded:
            return None, kept, errors
        processor = self.image_processor.ten_crop if ten_crop else self.image_processor
        return processor(decoded, return_tensors="pt").pixel_values, kept, errors

    def _locate_processed(self, pixel_values, names: list[str], top_k: int, extras: bool, ten_crop: bool
                          ) -> list[GeolocationResult]:
        """Geolocate processed images; with `ten_crop`, from the average of each image's ten crops."""
        if not ten_crop:
            return self.locate_pixel_values(pixel_values, top_k, extras=extras, names=names)
        return self._geolocate(top_k, False, names, num_crops=len(pixel_values) // len(names),
                               pixel_values=pixel_values.to(device=self.model.device, dtype=self.model.dtype))

    def locate_texts(self, texts: Iterable[str], top_k: int = 5, *, places: bool = False, extras: bool = False,
                     batch_size: int = DEFAULT_BATCH_SIZE) -> list[GeolocationResult]:
        """Geolocate descriptions such as "a beach with palm trees"; one result per text, in order.

        Raises:
            ValueError: when the model reads no text, or for a bad `top_k`.
        """
        if not self.capabilities.text:
            raise ValueError(f"The model {self.name} reads images only: it has no text encoder.")
        if self.tokenizer is None:
            raise ValueError(f"The model {self.name} was loaded without its tokenizer: pass one to read text.")
        texts = [str(text) for text in texts]
        self._check_top_k(top_k)
        errors = [_text_error(text, self.tokenizer) for text in texts]
        results = [None if error is None else GeolocationResult.failed(text, error)
                   for text, error in zip(texts, errors)]
        readable = [i for i, error in enumerate(errors) if error is None]
        for start in range(0, len(readable), _check_batch_size(batch_size)):
            rows = readable[start : start + batch_size]
            tokens = self.tokenizer([texts[i].strip() for i in rows], padding=True, return_tensors="pt")
            located = self._geolocate(top_k, extras, [texts[i] for i in rows],
                                      input_ids=tokens.input_ids.to(self.model.device),
                                      attention_mask=tokens.attention_mask.to(self.model.device))
            for i, result in zip(rows, located):
                results[i] = result
        return self._with_places(results) if places else results

    def locate_pixel_values(self, pixel_values: torch.Tensor, top_k: int = 5, *, extras: bool = False,
                            names: Sequence[str] | None = None) -> list[GeolocationResult]:
        """Geolocate processed images `(B, 3, H, W)` (the image processor's `pixel_values`)."""
        self._check_top_k(top_k)
        names = [f"image {i + 1}" for i in range(len(pixel_values))] if names is None else list(names)
        if len(names) != len(pixel_values):
            raise ValueError(f"names has {len(names)} entries for {len(pixel_values)} images: give one per image.")
        pixel_values = pixel_values.to(device=self.model.device, dtype=self.model.dtype)
        return self._geolocate(top_k, extras, names, pixel_values=pixel_values)

    # ---------------------------------------------------------------------------------------------- model
    def _check_top_k(self, top_k: int) -> None:
        """Raise `ValueError` unless 1 <= top_k <= the model's number of candidates."""
        if self.model.num_candidates == 0:
            kind = self.capabilities.uncertainty
            hint = ": call model.set_gallery(points) first" if kind == "gallery" else ""
            raise ValueError(f"The model {self.name} has no candidate locations (its {kind} is empty){hint}.")
        check_top_k(top_k, self.model.num_candidates)

    @torch.no_grad()
    def _geolocate(self, top_k: int, extras: bool, names: list[str], **inputs) -> list[GeolocationResult]:
        """One `model.geolocate` call for a batch -> one result per row. With `extras`, the call asks for up to
        `UNCERTAINTY_POINTS` candidates: the first `top_k` are the answer, all of them the uncertainty points."""
        capabilities = self.capabilities
        wants_uncertainty = extras and capabilities.uncertainty is not None
        wants_attention = extras and capabilities.attention and "pixel_values" in inputs
        shown = max(top_k, min(UNCERTAINTY_POINTS, self.model.num_candidates)) if wants_uncertainty else top_k
        candidates = shown
        if self.calibration is not None:  # the confidence counts the mass of this many candidates
            candidates = max(shown, min(self.calibration["candidates"], self.model.num_candidates))
        options = {"output_attentions": True} if wants_attention else {}
        pixel_values, scores = inputs.get("pixel_values"), None
        if pixel_values is not None and self.familiarity is not None:  # the tower runs once, for both uses
            tower_inputs, embeddings = tower_embedding(self.model, pixel_values, inputs.get("num_crops", 1))
            inputs = {**{k: v for k, v in inputs.items() if k != "pixel_values"}, **tower_inputs}
            scores = unfamiliarity_scores(self.familiarity, embeddings)
        output = self.model.geolocate(**inputs, top_k=candidates, **options)
        latitudes, longitudes, probabilities = (
            x.double().cpu().numpy() for x in (output.latitudes, output.longitudes, output.probabilities)
        )
        confidences = None
        if self.calibration is not None:
            masses = mass_near_best(latitudes, longitudes, probabilities, self.calibration["radii_km"])
            confidences = calibrated_confidence(self.calibration, masses)
        ids = self.model.candidate_ids(output.indices)
        results = []
        for row, name in enumerate(names):
            result = GeolocationResult(input=name, latitudes=latitudes[row, :top_k],
                                       longitudes=longitudes[row, :top_k], probabilities=probabilities[row, :top_k],
                                       candidate_ids=ids[row][:top_k])
            if confidences is not None:
                result.confidence = {radius: float(p) for radius, p in
                                     zip(self.calibration["radii_km"], confidences[row].tolist())}
            if scores is not None:
                result.unfamiliarity = float(scores[row])
                result.unfamiliar = bool(scores[row] > self.familiarity["threshold"])
            if wants_uncertainty:
                result.uncertainty = np.stack([latitudes[row, :shown], longitudes[row, :shown],
                                               probabilities[row, :shown]], axis=1)
                result.uncertainty_ids = ids[row][:shown]
            if extras and capabilities.scenes:
                result.scenes = self._scene_names(output.scene_probabilities[row])
            if wants_attention:
                result.attention = self._attention_maps(pixel_values[row], output, row)
            results.append(result)
        return results

    def _scene_names(self, probabilities: torch.Tensor) -> dict[str, float]:
        """Scene probabilities `(num_scenes,)` keyed by the config's `id2scene` names (else `id2label` when it has
        one name per scene, else "scene i")."""
        config = self.model.config
        names = {int(k): v for k, v in (getattr(config, "id2scene", None) or {}).items()}
        if not names and len(config.id2label) == len(probabilities):
            names = {int(k): v for k, v in config.id2label.items()}
        return {names.get(i, f"scene {i}"): float(p) for i, p in enumerate(probabilities.tolist())}

    def _attention_maps(self, pixel_values: torch.Tensor, output, row: int) -> list[AttentionMap]:
        """Per hierarchy level, the last decoder layer's cross-attention (mean over heads) of the predicted
        scene's query, drawn in red over the image the model saw (min-max scaled: red marks where it looked most).

        Args:
            pixel_values (`(3, H, W)`): the row's processed image.
            output: `geolocate(..., output_attentions=True)`: `cross_attentions` `(B, layers, heads, queries,
                tokens)` with scene-major queries (scene s, level l at s * num_levels + l) and the [CLS] token
                first, `scene_probabilities` `(B, num_scenes)`, `selected_scenes` `(B,)`.
        """
        num_levels = output.cross_attentions.shape[3] // output.scene_probabilities.shape[1]
        scene = int(output.selected_scenes[row])
        patches = output.cross_attentions[row, -1].float().mean(0)[:, 1:].cpu()  # drop the [CLS] token
        side = math.isqrt(patches.shape[1])
        mean = torch.tensor(self.image_processor.image_mean)[:, None, None]
        std = torch.tensor(self.image_processor.image_std)[:, None, None]
        pixels = ((pixel_values.float().cpu() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        base = Image.fromarray(pixels).resize((ATTENTION_SIZE, ATTENTION_SIZE), Image.Resampling.BICUBIC)
        maps = []
        for level in range(num_levels):
            weights = patches[scene * num_levels + level].reshape(side, side)
            weights = (weights - weights.min()) / (weights.max() - weights.min()).clamp_min(1e-12)
            opacity = (weights * 160).byte().numpy()  # red up to 160/255 where attention peaks
            mask = Image.fromarray(opacity).resize(base.size, Image.Resampling.BILINEAR)
            overlay = Image.composite(Image.new("RGB", base.size, (220, 20, 20)), base, mask)
            depth = "coarsest" if level == 0 else "finest" if level == num_levels - 1 else "middle"
            maps.append(AttentionMap(f"level {level + 1} of {num_levels} ({depth})", weights.numpy(), overlay))
        return maps

    @staticmethod
    def _with_places(results: list[GeolocationResult]) -> list[GeolocationResult]:
        """Add every prediction's place in words (`geoloc.geography.places`), with one search for the whole list."""
        latitudes = np.concatenate([result.latitudes for result in results] or [np.zeros(0)])
        longitudes = np.concatenate([result.longitudes for result in results] or [np.zeros(0)])
        found = iter(nearest_places(latitudes, longitudes) if len(latitudes) else [])
        for result in results:
            if result.error is None:
                result.places = [next(found) for _ in range(len(result.latitudes))]
        return results


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    return batch_size


def _image_name(image, position: int) -> str:
    """How an input image is named in its result: its path when it has one, else "image N"."""
    if isinstance(image, dict):
        image = image.get("path")
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    return f"image {position + 1}"


def _text_error(text: str, tokenizer) -> str | None:
    """Why a text cannot be geolocated (empty, or over the tokenizer's window), or None."""
    if not text.strip():
        return "The text is empty: describe a place, e.g. 'a beach with palm trees and volcanic rock'."
    length = len(tokenizer(text.strip()).input_ids)
    if length > tokenizer.model_max_length:
        return (f"The text is too long for this model ({length} tokens, it reads at most "
                f"{tokenizer.model_max_length}): shorten it.")
    return None


def nearest_places(latitudes, longitudes) -> list[dict]:
    """Each point in words (`geoloc.geography.places.describe_places`: the country or water it lies in, the nearest town
    when near): `{"name", "area", "water", "country", "place", "place_country", "km"}`."""
    from ..geography.places import describe_places

    return describe_places(latitudes, longitudes)


__all__ = ["AttentionMap", "Capabilities", "GeolocationResult", "Geolocator", "nearest_places", "resolve_model"]
