"""GeoCLIP (Vivanco Cepeda et al., NeurIPS 2023) as a transformers model.

A frozen CLIP image tower (and text tower, for text queries) feeds a small trainable MLP; a GPS encoder
(Equal Earth projection -> random Fourier features per sigma -> one MLP capsule per sigma, summed) maps
(lat, lon) into the same space. Geolocation is retrieval over a gallery of GPS points whose embeddings are
computed once and stored with the model.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_geoclip import GeoCLIPConfig, GeoCLIPLocationEncoderConfig
from .gallery_geoclip import GeoCLIPGallery, refine_hits, register_state
from .geo_common import (
    GeolocationOutput,
    StrictFromPretrainedMixin,
    check_top_k,
    from_microdegrees,
    to_microdegrees,
    validate_locations,
)
from .integrity import check_finite_answer


# Equal Earth projection constants (Šavrič, Patterson & Jenny 2018), as in the official GeoCLIP code.
_A1, _A2, _A3, _A4 = 1.340264, -0.081106, 0.000893, 0.003796
_SCALE = 66.50336


def equal_earth_projection(locations: torch.Tensor) -> torch.Tensor:
    """Project (N, 2) (lat, lon) degrees to (N, 2) Equal Earth (x, y), scaled as in the official GeoCLIP."""
    latitude, longitude = torch.deg2rad(locations[:, 0]), torch.deg2rad(locations[:, 1])
    sqrt3 = torch.sqrt(torch.tensor(3.0, dtype=locations.dtype, device=locations.device))
    theta = torch.asin(sqrt3 / 2 * torch.sin(latitude))
    denominator = 3 * (9 * _A4 * theta**8 + 7 * _A3 * theta**6 + 3 * _A2 * theta**2 + _A1)
    x = (2 * sqrt3 * longitude * torch.cos(theta)) / denominator
    y = _A4 * theta**9 + _A3 * theta**7 + _A2 * theta**3 + _A1 * theta
    return (torch.stack((x, y), dim=1) * _SCALE) / 180


@dataclass
class GeoCLIPOutput(ModelOutput):
    """Output of [`GeoCLIPModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): cross-entropy of each image against its own location
            among all the locations passed (when `return_loss=True`).
        logits_per_image (`torch.FloatTensor` of shape `(N, M)`): scaled cosine similarities, image x location.
        logits_per_location (`torch.FloatTensor` of shape `(M, N)`): the transpose.
        image_embeds (`torch.FloatTensor` of shape `(N, projection_dim)`): L2-normalised image embeddings.
        location_embeds (`torch.FloatTensor` of shape `(M, projection_dim)`): L2-normalised location embeddings.
    """

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_location: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    location_embeds: torch.Tensor | None = None


class GeoCLIPPreTrainedModel(StrictFromPretrainedMixin, PreTrainedModel):
    config: GeoCLIPConfig
    base_model_prefix = "geoclip"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # Random Fourier features at sigma=256 need fp32: bf16 would scramble the phases. The strict list is the one
    # `from_pretrained(..., dtype=torch.bfloat16)` honours (the plain one applies to fp16 only).
    _keep_in_fp32_modules_strict = ["location_encoder"]

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, GeoCLIPCapsule):
            init.normal_(module.rff_matrix, std=module.sigma)
        elif isinstance(module, nn.Linear) and not isinstance(module, _CLIP_TOWERS):
            # The official model trains from PyTorch's default (Kaiming-uniform) initialisation.
            bound = 1 / math.sqrt(module.in_features)
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, GeoCLIPModel):
            init.constant_(module.logit_scale, module.config.logit_scale_init_value)
            for buffer in (module.gps_queue_coordinates, module.gps_queue_ptr, module.gps_queue_count):
                init.zeros_(buffer)
        elif isinstance(module, GeoCLIPGallery):
            for buffer in module.buffers():
                init.zeros_(buffer)


_CLIP_TOWERS = (CLIPVisionModelWithProjection, CLIPTextModelWithProjection)


# Points encoded at a time on CPU: a capsule's (rows, hidden_size) activations then stay in the CPU caches
# (4 MB at 1024 x 1024 fp32) instead of streaming through memory between layers; 1.1-1.3x the points/s of
# 16K-row batches on a 2-core CPU, with bit-identical outputs (each output row is the same dot products).
CPU_ENCODING_ROWS = 1024


class GeoCLIPCapsule(nn.Module):
    """One sigma's branch: random Fourier features (N, 2) -> (N, 2*rff_dim), an MLP, and a linear head."""

    def __init__(self, config: GeoCLIPLocationEncoderConfig, sigma: float):
        super().__init__()
        self.sigma = float(sigma)
        self.register_buffer("rff_matrix", torch.empty(config.rff_dim, 2))
        layers = []
        width = 2 * config.rff_dim
        for _ in range(config.num_hidden_layers):
            # In place: ReLU's backward needs only its output, and skipping a copy saves memory traffic.
            layers += [nn.Linear(width, config.hidden_size), nn.ReLU(inplace=True)]
            width = config.hidden_size
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(width, config.projection_dim)

    def forward(self, projected: torch.Tensor) -> torch.Tensor:
        """(N, 2) fp32 Equal Earth coordinates -> (N, projection_dim); same operation order as the official `rff`
        package. Runs in fp32: `GeoCLIPLocationEncoder` turns autocast off and keeps these weights fp32."""
        phases = 2 * np.pi * projected @ self.rff_matrix.T
        return self.head(self.layers(torch.cat((torch.cos(phases), torch.sin(phases)), dim=-1)))


class GeoCLIPLocationEncoder(GeoCLIPPreTrainedModel):
    """GeoCLIP's GPS encoder on its own: (N, 2) degrees (lat, lon) -> (N, projection_dim) embeddings.

    Example:
        >>> encoder = GeoCLIPLocationEncoder(GeoCLIPLocationEncoderConfig())
        >>> encoder(torch.tensor([[40.7128, -74.0060]])).shape
        torch.Size([1, 512])
    """

    config: GeoCLIPLocationEncoderConfig
    main_input_name = "locations"
    input_modalities = ()
    _keep_in_fp32_modules_strict = ["capsules"]

    def __init__(self, config: GeoCLIPLocationEncoderConfig):
        super().__init__(config)
        self.capsules = nn.ModuleList(GeoCLIPCapsule(config, sigma) for sigma in config.sigmas)
        self.post_init()

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` / `.half()` must not reach the encoder: at sigma=256 the Fourier phases are
        # ~1e3 rad, which bf16 (3 significant digits) scrambles. Its fp32 tensors follow device moves only, with
        # their original values (taken before the cast, so nothing is rounded).
        def keep_fp32(tensor: torch.Tensor) -> torch.Tensor:
            converted = fn(tensor)
            if tensor.dtype == torch.float32 and converted.dtype in (torch.float16, torch.bfloat16):
                return tensor.to(converted.device)
            return converted

        return super()._apply(keep_fp32, recurse)

    def forward(self, locations: torch.Tensor) -> torch.Tensor:
        """Args: locations (`torch.Tensor` of shape `(N, 2)`): (latitude, longitude) in degrees.

        Returns: `torch.FloatTensor` of shape `(N, projection_dim)`, unnormalised, always computed in fp32 (autocast
        is turned off inside: under bf16/fp16 autocast the sigma=256 phases would lose their meaning). On CPU the
        points are encoded `CPU_ENCODING_ROWS` at a time (same values, faster).
        """
        locations = validate_locations(locations)
        device = self.capsules[0].rff_matrix.device
        with torch.autocast(device_type=device.type, enabled=False):
            projected = equal_earth_projection(locations.to(device, torch.float32))
            if device.type != "cpu" or len(projected) <= CPU_ENCODING_ROWS:
                return self._encode_projected(projected)
            return torch.cat([self._encode_projected(block) for block in projected.split(CPU_ENCODING_ROWS)])

    def _encode_projected(self, projected: torch.Tensor) -> torch.Tensor:
        """(n, 2) Equal Earth coordinates -> (n, projection_dim): the capsules' sum, in the official order
        (0 + c_0 + c_1 + ..., where 0 + c_0 == c_0 exactly)."""
        embeddings = self.capsules[0](projected)
        for capsule in self.capsules[1:]:
            embeddings = embeddings + capsule(projected)
        return embeddings


class GeoCLIPModel(GeoCLIPPreTrainedModel):
    """GeoCLIP: CLIP towers + image MLP + GPS encoder + learnable temperature, with a GPS queue for training
    and a stored gallery for retrieval (`model.gallery`, a [`GeoCLIPGallery`]).

    Example:
        >>> model = GeoCLIPModel.from_pretrained("path/to/converted")  # doctest: +SKIP
        >>> out = model.geolocate(pixel_values=pixel_values, top_k=5)  # doctest: +SKIP
        >>> out.latitudes.shape  # (batch, 5)  # doctest: +SKIP
    """

    config: GeoCLIPConfig

    # What front ends may ask of `geolocate` (read by `geoloc.inference.adapter`, never probed from signatures).
    predicts_scenes = False  # no `scene_probabilities`
    returns_attention_maps = False  # no `output_attentions`
    candidate_kind = "gallery"  # candidates are the points of a replaceable GPS gallery (`set_gallery`)
    # Checkpoints saved before the gallery became its own module (`model.gallery`) name its tensors thus.
    renamed_keys = {
        "gallery_coordinates": "gallery.coordinates",
        "gallery_embeddings": "gallery.embeddings",
        "gallery_index": "gallery.faiss_index",
        "gallery_sample_indices": "gallery.sample_indices",
        "gallery_sample_embeddings": "gallery.sample_embeddings",
    }

    @property
    def supports_text_queries(self) -> bool:
        """Whether `geolocate` takes `input_ids` (a text tower was built)."""
        return self.config.use_text_tower

    @property
    def text_aligned(self) -> bool:
        """Whether text queries mean something (`config.text_aligned`; see `GeoCLIPConfig`)."""
        return self.config.use_text_tower and self.config.text_aligned

    @property
    def num_candidates(self) -> int:
        """The largest `top_k` of `geolocate`: the gallery size."""
        return self.config.gallery_size

    def candidate_ids(self, indices: torch.Tensor) -> list[list[int | None]]:
        """The ids of `geolocate`'s `indices` `(B, k)`: gallery rows (None for a FAISS normaliser sample point)."""
        return [[row if row >= 0 else None for row in rows] for rows in indices.tolist()]

    def __init__(self, config: GeoCLIPConfig):
        super().__init__(config)
        self.image_tower = CLIPVisionModelWithProjection._from_config(config.vision_config)
        self.text_tower = (
            CLIPTextModelWithProjection._from_config(config.text_config) if config.use_text_tower else None
        )
        clip_dim = config.vision_config.projection_dim
        self.image_mlp = nn.Sequential(
            nn.Linear(clip_dim, config.image_mlp_hidden_size),
            nn.ReLU(),
            nn.Linear(config.image_mlp_hidden_size, config.projection_dim),
        )
        self.location_encoder = GeoCLIPLocationEncoder._from_config(config.location_config)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        # GPS queue: a ring buffer of recent training coordinates used as extra negatives.
        # Stored as int32 micro-degrees, like the gallery, so that no dtype cast can round the coordinates.
        register_state(self, "gps_queue_coordinates", torch.zeros(config.queue_size, 2, dtype=torch.int32))
        self.register_buffer("gps_queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("gps_queue_count", torch.zeros((), dtype=torch.long))
        self.gallery = GeoCLIPGallery(config)
        if config.freeze_backbone:
            for tower in (self.image_tower, self.text_tower):
                if tower is not None:
                    tower.requires_grad_(False)
        self.post_init()

    @classmethod
    def from_clip_backbone(cls, backbone: str, **config_kwargs) -> "GeoCLIPModel":
        """GeoCLIP on pretrained CLIP towers (the paper's setup), with a fresh image MLP, location encoder and
        temperature, and no gallery yet.

        Args:
            backbone (`str`): Hub id or folder of a CLIP checkpoint (e.g. `openai/clip-vit-large-patch14`, the
                paper's), whose vision and text towers with their projections are loaded.
            **config_kwargs: the other `GeoCLIPConfig` fields (e.g. `queue_size`, `location_config`).

        Example:
            >>> model = GeoCLIPModel.from_clip_backbone("openai/clip-vit-large-patch14", queue_size=4096)  # doctest: +SKIP
        """
        image_tower = CLIPVisionModelWithProjection.from_pretrained(backbone, dtype=torch.float32)
        text_tower = CLIPTextModelWithProjection.from_pretrained(backbone, dtype=torch.float32)
        config = GeoCLIPConfig(vision_config=image_tower.config, text_config=text_tower.config, backbone=str(backbone),
                               **config_kwargs)
        model = cls(config)
        model.image_tower.load_state_dict(image_tower.state_dict(), strict=True)
        model.text_tower.load_state_dict(text_tower.state_dict(), strict=True)
        return model

    def check_loaded_state(self, require_hashes: bool = True) -> None:
        """Checks of a loaded checkpoint that shapes and finiteness cannot show (called by `from_pretrained`): the
        GPS queue's coordinates in range and its pointers in bounds, then the gallery's own checks
        (`GeoCLIPGallery.check_loaded_state`: coordinates, normaliser rows, the FAISS index's SHA-256 and bytes).

        Raises:
            ValueError: naming the bad tensor (and row).
        """
        size, count, pointer = self.config.queue_size, int(self.gps_queue_count), int(self.gps_queue_ptr)
        if not (0 <= count <= size and 0 <= pointer < max(size, 1)):
            raise ValueError(
                f"The checkpoint's GPS queue is out of range: gps_queue_count={count} and gps_queue_ptr={pointer} "
                f"must lie in [0, {size}] and [0, {max(size, 1)}) (queue_size={size})."
            )
        validate_locations(self.gps_queue[:count], "checkpoint gps_queue_coordinates")
        self.gallery.check_loaded_state(require_hashes)

    # ----------------------------------------------------------------------------------------- features
    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, clip_image_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Image embeddings in the location space.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(N, 3, H, W)`): processed images.
            clip_image_embeds (`torch.FloatTensor` of shape `(N, clip_dim)`): precomputed CLIP image embeddings
                (the output of `get_clip_image_embeds`), to skip the frozen tower.

        Returns: `torch.FloatTensor` of shape `(N, projection_dim)`, unnormalised.
        """
        if (pixel_values is None) == (clip_image_embeds is None):
            raise ValueError("Pass exactly one of pixel_values or clip_image_embeds.")
        if clip_image_embeds is None:
            clip_image_embeds = self.get_clip_image_embeds(pixel_values)
        expected = self.config.vision_config.projection_dim
        if clip_image_embeds.ndim != 2 or clip_image_embeds.shape[0] == 0 or clip_image_embeds.shape[1] != expected:
            raise ValueError(
                f"clip_image_embeds must have shape (N>=1, {expected}), got {tuple(clip_image_embeds.shape)}."
            )
        return self.image_mlp(clip_image_embeds.to(self.image_mlp[0].weight.dtype))

    def get_clip_image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen CLIP tower's projected image embeddings, (N, 3, H, W) -> (N, clip_dim)."""
        if pixel_values.ndim != 4 or pixel_values.shape[0] == 0:
            raise ValueError(
                f"pixel_values must have shape (N>=1, {self.config.vision_config.num_channels}, H, W), "
                f"got {tuple(pixel_values.shape)}."
            )
        dtype = self.image_tower.visual_projection.weight.dtype
        return self.image_tower(pixel_values=pixel_values.to(dtype)).image_embeds

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings in the location space: CLIP text tower -> the image MLP (as in the paper).

        Args:
            input_ids (`torch.LongTensor` of shape `(N, L)`), attention_mask (`torch.LongTensor` of shape `(N, L)`).

        Returns: `torch.FloatTensor` of shape `(N, projection_dim)`, unnormalised.
        """
        if self.text_tower is None:
            raise ValueError("This GeoCLIP model was built without a text tower (config.use_text_tower=False).")
        if input_ids.ndim != 2 or input_ids.shape[0] == 0:
            raise ValueError(f"input_ids must have shape (N>=1, L), got {tuple(input_ids.shape)}.")
        text_embeds = self.text_tower(input_ids=input_ids, attention_mask=attention_mask).text_embeds
        return self.image_mlp(text_embeds.to(self.image_mlp[0].weight.dtype))

    def get_location_features(self, locations: torch.Tensor) -> torch.Tensor:
        """Location embeddings, (N, 2) degrees (lat, lon) -> (N, projection_dim), unnormalised."""
        return self.location_encoder(locations)

    # ------------------------------------------------------------------------------------------ training
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        locations: torch.Tensor | None = None,
        clip_image_embeds: torch.Tensor | None = None,
        return_loss: bool | None = None,
        labels: torch.Tensor | None = None,
    ) -> GeoCLIPOutput:
        """Score N images against M locations.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(N, 3, H, W)`) or clip_image_embeds (`(N, clip_dim)`).
            locations (`torch.FloatTensor` of shape `(M, 2)`): (lat, lon) degrees.
            return_loss (`bool`): compute the cross-entropy of each image against its true location among the M
                locations (training passes the GPS queue among them as extra negatives: `geoloc.training.geoclip_loss`).
            labels (`torch.LongTensor` of shape `(N,)`, *optional*): with `return_loss`, the row of `locations`
                holding image i's true location. Default: row i (then M must equal N). In multi-process training
                every process passes all processes' locations and points at its own rows, so each image meets the
                whole global batch as negatives, as in one big batch.
        """
        if locations is None:
            raise ValueError("forward needs locations of shape (M, 2); use geolocate() to search the gallery.")
        locations = validate_locations(locations)
        image_embeds = F.normalize(self.get_image_features(pixel_values, clip_image_embeds), dim=-1)
        location_embeds = F.normalize(self.get_location_features(locations), dim=-1).to(image_embeds.dtype)
        # Scale after the matmul, in the official code's order, so converted weights give identical logits.
        logits_per_image = self.logit_scale.exp() * (image_embeds @ location_embeds.T)
        loss = None
        if return_loss:
            labels = self._positive_rows(labels, len(image_embeds), len(location_embeds), image_embeds.device)
            loss = F.cross_entropy(logits_per_image.float(), labels)
        return GeoCLIPOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_location=logits_per_image.T,
            image_embeds=image_embeds,
            location_embeds=location_embeds,
        )

    @staticmethod
    def _positive_rows(labels, n_images: int, n_locations: int, device) -> torch.Tensor:
        """The checked `(N,)` row of each image's true location among the M locations (default: row i, M == N)."""
        if labels is None:
            if n_locations != n_images:
                raise ValueError(
                    f"return_loss needs one location per image, got {n_images} images and {n_locations} locations "
                    "(or pass labels: the row of each image's location)."
                )
            return torch.arange(n_images, device=device)
        labels = torch.as_tensor(labels, device=device)
        if labels.shape != (n_images,) or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be {n_images} integer rows of locations, got {labels.dtype} {tuple(labels.shape)}.")
        if n_images and (labels.min() < 0 or labels.max() >= n_locations):
            raise ValueError(f"labels must be rows of the {n_locations} locations, got values {labels.tolist()}.")
        return labels.long()

    @torch.no_grad()
    def enqueue_locations(self, locations: torch.Tensor) -> None:
        """Push (B, 2) coordinates into the GPS queue (a ring buffer; the oldest are overwritten).

        In multi-process training, pass the coordinates gathered from every process so that all replicas
        keep the same queue.
        """
        size = self.config.queue_size
        if size == 0:
            return
        locations = validate_locations(locations)[-size:].to(torch.float64)
        coordinates = to_microdegrees(locations).to(self.gps_queue_coordinates.device)
        positions = (int(self.gps_queue_ptr) + torch.arange(len(locations))) % size
        self.gps_queue_coordinates[positions.to(coordinates.device)] = coordinates
        self.gps_queue_ptr.fill_((int(self.gps_queue_ptr) + len(locations)) % size)
        self.gps_queue_count.fill_(min(size, int(self.gps_queue_count) + len(locations)))

    @property
    def gps_queue(self) -> torch.Tensor:
        """The GPS queue as (queue_size, 2) float64 degrees (lat, lon); rows past `gps_queue_count` are unused."""
        return from_microdegrees(self.gps_queue_coordinates)

    # ------------------------------------------------------------------------------------------- gallery
    @property
    def gallery_locations(self) -> torch.Tensor:
        """The gallery as (G, 2) float64 degrees (lat, lon)."""
        return self.gallery.locations

    def _embed_locations(self, locations: torch.Tensor) -> torch.Tensor:
        """(M, 2) degrees -> (M, D) float32 normalised location embeddings."""
        return F.normalize(self.get_location_features(locations.to(self.logit_scale.device)).float(), dim=-1)

    @torch.no_grad()
    def set_gallery(
        self, locations, batch_size: int = 16384, show_progress: bool = False, backend: str = "exact",
        calibration_queries: torch.Tensor | None = None, **index_options,
    ) -> None:
        """Replace the retrieval gallery: encode `locations` in batches and build the search structure.

        The gallery (coordinates, embeddings or FAISS index, normaliser sample) is saved by `save_pretrained`
        and restored by `from_pretrained` without re-encoding; the config records the backend and its options.

        What `geolocate(...).probabilities` means per backend:
        - `"exact"`: the exact softmax over the whole gallery (over the stored embeddings, so rounded to
          `embedding_dtype`), computed in chunks with a streaming logsumexp.
        - `"faiss"`: exact scores of the `n_candidates` retrieved hits, divided by an estimated normaliser: the
          hits' exact mass plus the non-retrieved mass estimated from a fixed random sample of the gallery
          (`normaliser_sample_size` rows stored at build time) scaled by (N - hits) / sample rows. Close to the
          exact softmax for the top hits (see `modeling_geoclip.gallery_geoclip`).

        How close `"faiss"` hits are to `"exact"` ones is measured while the index is built: the exact top-5 of
        calibration queries is computed alongside, `nprobe` (when not given) is raised until recall@5 on half of
        them reaches `target_recall` (default 0.995), and recall@5 on the other, held-out half is stored as
        `model.config.gallery_options["recall_estimate"]` (saved by `save_pretrained`), e.g.
        `{"recall_at_5": 0.996, "queries": 256, "query_source": "proxy: 512 random unit vectors", "nprobe": 1448}`.
        Pass real query embeddings as `calibration_queries` (e.g. `F.normalize(model.get_image_features(...))`
        of a few hundred validation images) for an estimate about your queries; without them the proxy is random
        unit vectors, which are, like image and text embeddings, far from every gallery point (see
        `benchmarks/bench_scale.py` for how their recall compares with real image and text queries).

        Args:
            locations: (N, 2) degrees (lat, lon) as a tensor, numpy array or list (`geoloc.data.gallery` loads them
                from a CSV, a Dataset or the Hub).
            batch_size (`int`): points encoded at a time.
            show_progress (`bool`): show a progress bar while encoding.
            backend (`str`): `"exact"` or `"faiss"` (needs `pip install faiss-cpu`, also for remote-code users).
            calibration_queries (`torch.FloatTensor` of shape `(Q, projection_dim)`, *optional*): `faiss` only:
                query embeddings to calibrate and estimate recall on (Q >= 2: even rows tune, odd rows estimate).
            **index_options: backend options, see `gallery_geoclip.resolve_gallery_options`, e.g.
                `embedding_dtype="bfloat16"` for `exact`; `index="IVF1024,Flat"`, `nprobe=32`,
                `target_recall=0.995` for `faiss`.

        Raises:
            ValueError: bad locations, an empty gallery, a bad backend or option, or calibration queries that
            are not (Q >= 2, projection_dim) finite numbers or come with `backend="exact"`. ImportError: `faiss`
            backend without faiss installed.

        Example:
            >>> model.set_gallery(locations, backend="faiss")  # doctest: +SKIP
            >>> model.config.gallery_options["recall_estimate"]["recall_at_5"]  # doctest: +SKIP
            0.996
        """
        self.gallery.build(locations, self._embed_locations, batch_size=batch_size, show_progress=show_progress,
                           backend=backend, calibration_queries=calibration_queries, **index_options)

    @torch.no_grad()
    def search_gallery(self, query_embeds: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k gallery rows for normalised queries, with the backend chosen by `set_gallery`.

        Args:
            query_embeds (`torch.FloatTensor` of shape `(B, projection_dim)`): L2-normalised queries.
            top_k (`int`): hits per query.

        Returns: `(probabilities, indices)`, each `(B, top_k)`, best first; `probabilities` as documented in
        `set_gallery` (exact softmax over the gallery for `exact`, estimated normaliser for `faiss`).
        """
        logits, indices, log_normaliser = self.gallery.search(query_embeds, self.logit_scale.exp(), top_k,
                                                              self._embed_locations)
        return torch.exp(logits - log_normaliser[:, None]), indices

    @torch.no_grad()
    def geolocate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        top_k: int = 5,
        clip_image_embeds: torch.Tensor | None = None,
        refine: bool = False,
        refine_radius_km: float = 25.0,
        refine_samples: int = 64,
    ) -> GeolocationOutput:
        """Top-k gallery locations for a batch of images (or texts, or cached CLIP image embeddings).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): processed images, or
            input_ids (`torch.LongTensor` of shape `(B, L)`) with attention_mask: tokenised texts, or
            clip_image_embeds (`torch.FloatTensor` of shape `(B, clip_dim)`): precomputed CLIP embeddings.
            top_k (`int`): predictions per input, 1 <= top_k <= gallery size.
            refine (`bool`): local refinement around the top hits (a documented extension: the GeoCLIP paper
                predicts the best gallery point and describes no refinement step). `refine_samples` points per
                hit are drawn around each of the top_k hits (random bearing, distance |N(0, refine_radius_km)|),
                encoded with the location encoder, scored, and hits + samples are re-ranked.

        Returns: [`GeolocationOutput`] with `latitudes`, `longitudes`, `probabilities`, `indices`, each
        `(B, top_k)`, best first. `probabilities` is the softmax over the whole gallery: exact for the `exact`
        backend, with an estimated normaliser for `faiss` (see `set_gallery`). With `refine=True` it is the
        softmax over the gallery plus the sampled points, and `indices` is -1 for sampled points.
        """
        if sum(x is not None for x in (pixel_values, input_ids, clip_image_embeds)) != 1:
            raise ValueError("Pass exactly one of pixel_values, input_ids or clip_image_embeds.")
        if self.config.gallery_size == 0:
            raise ValueError("This model has no gallery: call model.set_gallery(locations) first.")
        top_k = check_top_k(top_k, self.config.gallery_size)
        if input_ids is not None:
            query = self.get_text_features(input_ids, attention_mask)
        else:
            query = self.get_image_features(pixel_values, clip_image_embeds)
        query = F.normalize(query.float(), dim=-1)
        logits, indices, log_normaliser = self.gallery.search(query, self.logit_scale.exp(), top_k,
                                                              self._embed_locations)
        coordinates = from_microdegrees(self.gallery.coordinates[indices])
        if refine:
            coordinates, probabilities, source = refine_hits(
                query, self.logit_scale.exp(), coordinates, logits, log_normaliser, self._embed_locations,
                radius_km=refine_radius_km, num_samples=refine_samples,
            )
            source = source.to(indices.device)
            indices = torch.where(source >= 0, indices.gather(1, source.clamp(min=0)), -1)
        else:
            probabilities = torch.exp(logits - log_normaliser[:, None])
        check_finite_answer(latitudes=coordinates[..., 0], longitudes=coordinates[..., 1], probabilities=probabilities)
        return GeolocationOutput(
            latitudes=coordinates[..., 0],
            longitudes=coordinates[..., 1],
            probabilities=probabilities,
            indices=indices,
        )


__all__ = [
    "GeoCLIPLocationEncoder",
    "GeoCLIPModel",
    "GeoCLIPOutput",
    "GeoCLIPPreTrainedModel",
    "equal_earth_projection",
]
