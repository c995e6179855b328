"""GeoHier: the GeoDecoder of Clark et al., "Where We Are and What We're Looking At: Query Based Worldwide
Image Geo-localization Using Hierarchies and Scenes" (CVPR 2023), as a transformers model.

An image encoder (ViT or CLIP vision tower) turns the image into tokens. One learned query per
(scene, hierarchy level) pair cross-attends to them through N hierarchy-independent decoder layers (self-attention
over all queries) and E hierarchy-dependent layers (self-attention only among the queries of one level, one FFN per
level). Channel 0 of the queries, averaged over levels, scores the scenes; the queries of the chosen scene feed
one cell classifier per level. At inference each cell's probability is multiplied by its ancestors' and the best
fine cells are returned at the mean position of their training images (the cell table stored with the model).
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, CLIPVisionModel, PreTrainedModel, ViTModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_geohier import SUPPORTED_BACKBONES, GeoHierConfig
from .geo_common import (
    GeolocationOutput,
    StrictFromPretrainedMixin,
    check_top_k,
    from_microdegrees,
    to_microdegrees,
    validate_locations,
)
from .integrity import check_finite_answer


def s2_token_to_id(token: str) -> int:
    """S2 cell token (hex, trailing zeros stripped) -> signed 64-bit cell id, without a geometry library."""
    if not isinstance(token, str) or not 1 <= len(token) <= 16 or token.strip("0123456789abcdefABCDEF"):
        raise ValueError(f"{token!r} is not an S2 cell token (1 to 16 hex digits).")
    value = int(token.ljust(16, "0"), 16)
    return value - (1 << 64) if value >= 1 << 63 else value


def s2_id_to_token(cell_id: int) -> str:
    """Signed or unsigned 64-bit S2 cell id -> token (hex with trailing zeros stripped; "X" for id 0)."""
    return format(int(cell_id) % (1 << 64), "016x").rstrip("0") or "X"


@dataclass
class GeoHierOutput(ModelOutput):
    """Output of [`GeoHierModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): weighted label-smoothed cell cross-entropies, plus the
            weighted scene cross-entropy when scene labels are given (only when `labels` are given).
        logits (`tuple[torch.FloatTensor]`, one per level, coarse to fine, each of shape `(B, cells_per_level[l])`):
            cell logits computed from the queries of the selected scene.
        scene_logits (`torch.FloatTensor` of shape `(B, num_scenes)`): channel 0 of the final queries averaged over
            levels.
        selected_scenes (`torch.LongTensor` of shape `(B,)`): the scene whose queries produced `logits` (the
            ground-truth scene where a scene label is given, else the argmax of `scene_logits`).
        query_hidden_states (`torch.FloatTensor` of shape `(B, num_scenes, num_levels, hidden_size)`): the decoded
            queries after the final LayerNorm.
        cross_attentions (`torch.FloatTensor` of shape `(B, num_layers, num_heads, num_queries, num_tokens)`,
            *optional*): with `output_attentions=True`, each decoder layer's attention of every query over the image
            tokens (`num_layers = N + E`; query `s * num_levels + l` is scene s, level l; token 0 is the backbone's
            [CLS] token, the others its patches in row-major order).
    """

    loss: torch.Tensor | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    scene_logits: torch.Tensor | None = None
    selected_scenes: torch.Tensor | None = None
    query_hidden_states: torch.Tensor | None = None
    cross_attentions: torch.Tensor | None = None


@dataclass
class GeoHierGeolocationOutput(GeolocationOutput):
    """The answer of [`GeoHierModel.geolocate`]: the shared `GeolocationOutput` fields plus GeoHier's extras.

    Args:
        latitudes (`torch.FloatTensor` of shape `(B, top_k)`): centroid latitudes of the best fine cells, degrees.
        longitudes (`torch.FloatTensor` of shape `(B, top_k)`): centroid longitudes, degrees.
        probabilities (`torch.FloatTensor` of shape `(B, top_k)`): probability of each fine cell, best first: its
            softmax probability times its parent's hierarchical probability (the paper's product, which sets the
            ranking), normalised over all fine cells so that the fine cells' probabilities sum to 1.
        indices (`torch.LongTensor` of shape `(B, top_k)`): fine-cell indices (rows of the finest level).
        level_probabilities (`tuple[torch.FloatTensor]`, one per level, each `(B, cells_per_level[l])`): the
            normalised hierarchical probability of every cell of every level, coarse to fine (for maps); each row
            sums to 1.
        scene_probabilities (`torch.FloatTensor` of shape `(B, num_scenes)`): softmax of the scene logits.
        selected_scenes (`torch.LongTensor` of shape `(B,)`): the predicted scene whose queries were classified.
        cross_attentions (`torch.FloatTensor`, *optional*): with `output_attentions=True`, as in `GeoHierOutput`.
    """

    level_probabilities: tuple[torch.Tensor, ...] | None = None
    scene_probabilities: torch.Tensor | None = None
    selected_scenes: torch.Tensor | None = None
    cross_attentions: torch.Tensor | None = None


class GeoHierAttention(nn.Module):
    """Multi-head attention of queries `(B, Q, D)` over keys/values `(B, T, D)`, optional additive mask `(Q, T)`."""

    def __init__(self, config: GeoHierConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the attended values `(B, Q, D)` and, with `output_attentions`, the weights `(B, heads, Q, T)`."""
        batch, n_queries, _ = hidden_states.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)

        query = heads(self.q_proj(hidden_states))
        key, value = heads(self.k_proj(key_value_states)), heads(self.v_proj(key_value_states))
        dropout = self.dropout if self.training else 0.0
        weights = None
        if output_attentions:
            scores = query @ key.transpose(-1, -2) / self.head_dim**0.5
            if attention_mask is not None:
                scores = scores + attention_mask
            weights = scores.softmax(dim=-1)
            attended = F.dropout(weights, dropout, self.training) @ value
        else:
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout)
        attended = attended.transpose(1, 2).reshape(batch, n_queries, -1)
        return self.out_proj(attended), weights


class GeoHierFeedForward(nn.Module):
    """Pre-LayerNorm FFN block: LayerNorm -> Linear -> GELU -> Dropout -> Linear, `(..., D) -> (..., D)`."""

    def __init__(self, config: GeoHierConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(self.layer_norm(hidden_states)))))


class GeoHierDecoderLayer(GradientCheckpointingLayer):
    """One pre-LayerNorm decoder layer over the queries `(B, num_scenes * num_levels, D)`, scene-major:
    cross-attention to the image tokens, self-attention among the queries, FFN.

    Hierarchy-independent (`hierarchy_dependent=False`): every query attends to every query, one shared FFN.
    Hierarchy-dependent: self-attention is masked to the queries of the same level and each level has its own FFN,
    so the levels only meet through the image tokens they all read.

    A `GradientCheckpointingLayer`: after `model.gradient_checkpointing_enable()` its activations are recomputed in
    the backward pass instead of kept (the queries and image tokens are passed positionally, so they get gradients).
    """

    def __init__(self, config: GeoHierConfig, hierarchy_dependent: bool):
        super().__init__()
        self.num_levels = config.num_levels
        self.cross_attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.cross_attention = GeoHierAttention(config)
        self.self_attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attention = GeoHierAttention(config)
        self.feed_forwards = nn.ModuleList(
            GeoHierFeedForward(config) for _ in range(config.num_levels if hierarchy_dependent else 1)
        )
        self.dropout = nn.Dropout(config.dropout)
        self.hierarchy_dependent = hierarchy_dependent

    def self_attention_mask(self, queries: torch.Tensor) -> torch.Tensor | None:
        """Additive `(Q, Q)` mask letting each query see only the queries of its level (None when independent)."""
        if not self.hierarchy_dependent:
            return None
        level = torch.arange(queries.shape[1], device=queries.device) % self.num_levels
        mask = torch.zeros(len(level), len(level), dtype=queries.dtype, device=queries.device)
        return mask.masked_fill(level[:, None] != level[None, :], float("-inf"))

    def forward(
        self, queries: torch.Tensor, image_tokens: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Args:
            queries (`torch.FloatTensor` of shape `(B, Q, D)`), image_tokens (`torch.FloatTensor` of shape `(B, T, D)`).

        Returns: the new queries `(B, Q, D)` and, with `output_attentions`, the cross-attention `(B, heads, Q, T)`.
        """
        attended, cross_weights = self.cross_attention(
            self.cross_attention_norm(queries), image_tokens, output_attentions=output_attentions
        )
        queries = queries + self.dropout(attended)
        normed = self.self_attention_norm(queries)
        mask = self.self_attention_mask(normed)
        queries = queries + self.dropout(self.self_attention(normed, normed, attention_mask=mask)[0])
        if not self.hierarchy_dependent:
            update = self.feed_forwards[0](queries)
        else:
            by_level = queries.unflatten(1, (-1, self.num_levels))  # (B, S, L, D)
            update = torch.stack(
                [ffn(by_level[:, :, level]) for level, ffn in enumerate(self.feed_forwards)], dim=2
            ).flatten(1, 2)
        return queries + self.dropout(update), cross_weights


class GeoHierPreTrainedModel(StrictFromPretrainedMixin, PreTrainedModel):
    config: GeoHierConfig
    base_model_prefix = "geohier"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True  # the backbone's layers and the decoder's
    _supports_sdpa = True
    _no_split_modules = ["GeoHierDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, GeoHierModel):
            init.normal_(module.queries, std=1.0)
        elif isinstance(module, GeoHierCellTable):
            # A table whose buffers are (re)initialised here holds no cells: a new model, or a checkpoint loaded with
            # other `cells_per_level` (`ignore_mismatched_sizes=True`, as `geoloc train --model-config` does with
            # freshly built geocells). Its config must not claim the checkpoint's table (zeros are no valid table).
            if any(not getattr(buffer, "_is_hf_initialized", False) for buffer in module.buffers()):
                self.config.has_cell_table = False
            for buffer in module.buffers():
                init.zeros_(buffer)


class GeoHierCellTable(nn.Module):
    """The geocells of every level, stored as buffers so that inference needs no geometry library.

    Buffers of level l (`n = cells_per_level[l]`): `cell_ids_l` `(n,)` int64 S2 cell ids, `centroids_l` `(n, 2)`
    int32 micro-degrees (latitude, longitude), `parents_l` `(n,)` int64 row of the parent cell in level l-1 (-1 for
    level 0), `counts_l` `(n,)` int64 training points per cell.
    """

    def __init__(self, cells_per_level):
        super().__init__()
        for level, n in enumerate(cells_per_level):
            self.register_buffer(f"cell_ids_{level}", torch.zeros(n, dtype=torch.long))
            self.register_buffer(f"centroids_{level}", torch.zeros(n, 2, dtype=torch.int32))
            self.register_buffer(f"parents_{level}", torch.zeros(n, dtype=torch.long))
            self.register_buffer(f"counts_{level}", torch.zeros(n, dtype=torch.long))

    def get(self, name: str, level: int) -> torch.Tensor:
        return getattr(self, f"{name}_{level}")


class GeoHierModel(GeoHierPreTrainedModel):
    """GeoHier (GeoDecoder): image encoder + scene/hierarchy query decoder + one cell classifier per level.

    Example:
        >>> from geoloc.configs import tiny_geohier_config
        >>> model = GeoHierModel(tiny_geohier_config())
        >>> out = model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([[0, 1, 2], [3, 4, 5]]))
        >>> [tuple(l.shape) for l in out.logits], tuple(out.scene_logits.shape)
        ([(2, 8), (2, 16), (2, 32)], (2, 4))
    """

    config: GeoHierConfig

    # What front ends may ask of `geolocate` (read by `geoloc.inference.adapter`, never probed from signatures).
    supports_text_queries = False  # images only
    returns_attention_maps = True  # `geolocate(..., output_attentions=True)` -> `cross_attentions`
    supports_ten_crop = True  # `geolocate(..., num_crops=10)` on `GeoHierImageProcessor.ten_crop` pixels
    candidate_kind = "cells"  # candidates are the fine geocells (centroids)

    @property
    def predicts_scenes(self) -> bool:
        """Whether `scene_probabilities` mean something: the model was trained with scene labels."""
        return self.config.trained_with_scene_labels

    @property
    def num_candidates(self) -> int:
        """The largest `top_k` of `geolocate`: the number of fine cells."""
        return self.config.cells_per_level[-1]

    def candidate_ids(self, indices: torch.Tensor) -> list[list[str]]:
        """The ids of `geolocate`'s `indices` `(B, k)`: the fine cells' S2 tokens."""
        cell_ids = self.cell_table.get("cell_ids", self.config.num_levels - 1).cpu()
        return [[s2_id_to_token(cell_ids[row]) for row in rows] for rows in indices.tolist()]

    def __init__(self, config: GeoHierConfig):
        super().__init__(config)
        vision = config.vision_config
        if vision.model_type == "vit":
            self.backbone = ViTModel._from_config(vision, add_pooling_layer=False)
        else:
            self.backbone = CLIPVisionModel._from_config(vision)
        if config.freeze_backbone:
            self.backbone.requires_grad_(False)
        if vision.model_type == "clip_vision_model":
            # The decoder reads CLIP's `last_hidden_state`, which comes before `post_layernorm` (that norm only makes
            # the pooled [CLS] output): frozen, so that it is not a parameter without a gradient (DDP refuses those).
            self.backbone.post_layernorm.requires_grad_(False)
        self.token_projection = nn.Linear(vision.hidden_size, config.hidden_size)
        self.token_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # Row s * num_levels + l is the query of scene s at level l.
        self.queries = nn.Parameter(torch.empty(config.num_queries, config.hidden_size))
        self.independent_layers = nn.ModuleList(
            GeoHierDecoderLayer(config, hierarchy_dependent=False) for _ in range(config.num_independent_layers)
        )
        self.dependent_layers = nn.ModuleList(
            GeoHierDecoderLayer(config, hierarchy_dependent=True) for _ in range(config.num_dependent_layers)
        )
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifiers = nn.ModuleList(nn.Linear(config.hidden_size, n) for n in config.cells_per_level)
        self.cell_table = GeoHierCellTable(config.cells_per_level)
        self.post_init()

    @classmethod
    def from_backbone(cls, backbone: str, **config_kwargs) -> "GeoHierModel":
        """GeoHier on a pretrained image encoder, with a freshly initialised decoder and classifiers.

        Args:
            backbone (`str`): Hub id or folder of a ViT checkpoint (e.g. `google/vit-base-patch16-224-in21k`, the
                co-author's choice) or of a CLIP checkpoint (its vision tower is used).
            **config_kwargs: the other `GeoHierConfig` fields (e.g. `cells_per_level`).

        Raises:
            ValueError: when the checkpoint is neither a ViT nor a CLIP model.

        Example:
            >>> model = GeoHierModel.from_backbone("google/vit-base-patch16-224-in21k", cells_per_level=[10, 40])  # doctest: +SKIP
        """
        backbone_config = AutoConfig.from_pretrained(backbone)
        if backbone_config.model_type == "clip":
            backbone_config = backbone_config.vision_config
        if backbone_config.model_type not in SUPPORTED_BACKBONES:
            raise ValueError(
                f"The backbone '{backbone}' is a {backbone_config.model_type!r} model; GeoHier sits on a ViT or a "
                "CLIP vision tower."
            )
        if backbone_config.model_type == "vit":
            pretrained = ViTModel.from_pretrained(backbone, add_pooling_layer=False, dtype=torch.float32)
        else:
            pretrained = CLIPVisionModel.from_pretrained(backbone, dtype=torch.float32)
        model = cls(GeoHierConfig(vision_config=pretrained.config, **config_kwargs))
        model.backbone.load_state_dict(pretrained.state_dict(), strict=True)
        return model

    # ------------------------------------------------------------------------------------------ features
    def get_backbone_hidden_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image encoder's tokens, `(B, 3, H, W)` -> `(B, T, vision_hidden_size)` (T = 1 + patches)."""
        if pixel_values.ndim != 4 or pixel_values.shape[0] == 0:
            raise ValueError(
                f"pixel_values must have shape (B>=1, {self.config.vision_config.num_channels}, H, W), "
                f"got {tuple(pixel_values.shape)}."
            )
        dtype = self.token_projection.weight.dtype
        return self.backbone(pixel_values=pixel_values.to(dtype)).last_hidden_state

    def decode(
        self, backbone_hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the query decoder on backbone tokens.

        Args:
            backbone_hidden_states (`torch.FloatTensor` of shape `(B, T, vision_hidden_size)`).

        Returns: queries `(B, num_scenes, num_levels, hidden_size)` after the final LayerNorm, and with
        `output_attentions` the cross-attention maps `(B, N + E, heads, num_queries, T)`.
        """
        expected = self.config.vision_config.hidden_size
        if backbone_hidden_states.ndim != 3 or backbone_hidden_states.shape[-1] != expected:
            raise ValueError(
                f"backbone_hidden_states must have shape (B, T, {expected}), got {tuple(backbone_hidden_states.shape)}."
            )
        if backbone_hidden_states.shape[0] == 0:
            raise ValueError("The batch is empty: pass at least one image.")
        image_tokens = self.token_norm(self.token_projection(backbone_hidden_states.to(self.queries.dtype)))
        queries = self.queries.unsqueeze(0).expand(len(image_tokens), -1, -1)
        maps = []
        for layer in (*self.independent_layers, *self.dependent_layers):
            queries, weights = layer(queries, image_tokens, output_attentions=output_attentions)
            maps.append(weights)
        queries = self.final_norm(queries).unflatten(1, (self.config.num_scenes, self.config.num_levels))
        return queries, (torch.stack(maps, dim=1) if output_attentions and maps else None)

    # ------------------------------------------------------------------------------------------ training
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        scene_labels: torch.Tensor | None = None,
        backbone_hidden_states: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> GeoHierOutput:
        """Cell logits of every level and scene logits for a batch of images.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): processed images, or
            backbone_hidden_states (`torch.FloatTensor` of shape `(B, T, vision_hidden_size)`): cached encoder tokens
                (only with a frozen backbone).
            labels (`torch.LongTensor` of shape `(B, num_levels)`): cell index of each image at each level, coarse to
                fine; -1 where the image has no cell at that level (ignored).
            scene_labels (`torch.LongTensor` of shape `(B,)`, *optional*): scene of each image, -1 if unknown. With
                labels the scene loss is added; the queries classified are those of the predicted scene, or of the
                labelled one where known if `config.scene_selection == "label"`.
            output_attentions (`bool`): also return the cross-attention maps.
        """
        if (pixel_values is None) == (backbone_hidden_states is None):
            raise ValueError("Pass exactly one of pixel_values or backbone_hidden_states.")
        if backbone_hidden_states is None:
            backbone_hidden_states = self.get_backbone_hidden_states(pixel_values)
        queries, cross_attentions = self.decode(backbone_hidden_states, output_attentions)
        batch = len(queries)
        scene_logits = queries[..., 0].mean(dim=2)
        selected = scene_logits.argmax(dim=1)
        if scene_labels is not None:
            scene_labels = self._check_labels(scene_labels, (batch,), [self.config.num_scenes], "scene_labels")
            if self.config.scene_selection == "label":
                selected = torch.where(scene_labels >= 0, scene_labels, selected)
        chosen = queries[torch.arange(batch, device=queries.device), selected]  # (B, L, D)
        logits = tuple(classifier(chosen[:, level]) for level, classifier in enumerate(self.classifiers))

        loss = None
        if labels is not None:
            labels = self._check_labels(
                labels, (batch, self.config.num_levels), self.config.cells_per_level, "labels"
            )
            loss = self.loss_from_logits(logits, labels, scene_logits, scene_labels)
        return GeoHierOutput(
            loss=loss,
            logits=logits,
            scene_logits=scene_logits,
            selected_scenes=selected,
            query_hidden_states=queries,
            cross_attentions=cross_attentions,
        )

    def loss_from_logits(
        self,
        logits: tuple[torch.Tensor, ...],
        labels: torch.Tensor,
        scene_logits: torch.Tensor | None = None,
        scene_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The training loss of `forward`: each level's label-smoothed cross-entropy times its `loss_weights`
        entry, plus `scene_loss_weight` times the scene cross-entropy (smoothed by `scene_label_smoothing`) where
        scene labels are given. Labels of -1 are ignored."""
        loss = sum(
            weight * self._cross_entropy(level_logits, labels[:, level], self.config.label_smoothing)
            for level, (weight, level_logits) in enumerate(zip(self.config.loss_weights, logits))
        )
        if scene_labels is not None:
            scene_loss = self._cross_entropy(scene_logits, scene_labels, self.config.scene_label_smoothing)
            loss = loss + self.config.scene_loss_weight * scene_loss
        return loss

    @staticmethod
    def _check_labels(labels, shape: tuple, sizes, name: str) -> torch.Tensor:
        """Check integer labels of `shape` whose column j lies in [-1, sizes[j]) (one size for 1-D labels)."""
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"{name} must be integers, got dtype {labels.dtype}.")
        if tuple(labels.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(labels.shape)}.")
        upper = torch.as_tensor(sizes, device=labels.device)
        bad = (labels < -1) | (labels >= upper)
        if bad.any():
            position = tuple(bad.nonzero()[0].tolist())
            raise ValueError(
                f"{name}{list(position)} = {int(labels[position])}: must be -1 (ignored) or a valid index "
                f"below {sizes[position[-1]] if labels.ndim == 2 else sizes[0]}."
            )
        return labels.long()

    @staticmethod
    def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        """Mean cross-entropy over the rows whose target is not -1 (0 when there is none)."""
        if not (targets >= 0).any():
            return logits.sum() * 0.0
        return F.cross_entropy(
            logits.float(), targets.to(logits.device), ignore_index=-1, label_smoothing=label_smoothing
        )

    # ----------------------------------------------------------------------------------------- cell table
    @torch.no_grad()
    def set_cell_table(self, cells) -> None:
        """Store the geocells (S2 ids, centroids, parents, counts) with the model.

        Args:
            cells: one entry per level, coarse to fine, each a mapping with `tokens` (S2 tokens, n strings),
                `latitudes` and `longitudes` (n centroid degrees), `parents` (n row indices into the previous
                level; -1 or absent for level 0) and `counts` (n training points) — the first output of
                `geoloc.geography.geocells.build_geocells` / `load_geoestimation_partitions`.

        Raises:
            ValueError: wrong number of levels or cells (the config's `cells_per_level`), bad tokens, coordinates or
                parents (each parent must be a row of the level above).
        """
        if len(cells) != self.config.num_levels:
            raise ValueError(f"The cell table has {len(cells)} levels but the model has {self.config.num_levels}.")
        # Validate and convert every level before writing any buffer: a bad level leaves the stored table intact.
        levels = []
        for level, (table, expected) in enumerate(zip(cells, self.config.cells_per_level)):
            tokens = list(table["tokens"])
            if len(tokens) != expected:
                raise ValueError(
                    f"Level {level} of the cell table has {len(tokens)} cells but the model has {expected}; build the "
                    f"config with cells_per_level={[len(t['tokens']) for t in cells]}."
                )
            latitudes = np.asarray(table["latitudes"], dtype=np.float64).reshape(-1)
            longitudes = np.asarray(table["longitudes"], dtype=np.float64).reshape(-1)
            if len(latitudes) != expected or len(longitudes) != expected:
                raise ValueError(
                    f"Level {level}: {len(latitudes)} latitudes and {len(longitudes)} longitudes for {expected} cells."
                )
            coordinates = validate_locations(
                np.stack([latitudes, longitudes], axis=1), f"cell table level {level} centroids"
            ).numpy()
            parents = np.asarray(table.get("parents", np.full(expected, -1)), dtype=np.int64).reshape(-1)
            if len(parents) != expected:
                raise ValueError(f"Level {level}: {len(parents)} parents for {expected} cells.")
            n_above = self.config.cells_per_level[level - 1] if level else 0
            valid = (parents >= 0) & (parents < n_above) if level else parents == -1
            if not valid.all():
                row = int(np.flatnonzero(~valid)[0])
                allowed = f"a row of level {level - 1}, in [0, {n_above})" if level else "-1 (level 0 has no parent)"
                raise ValueError(f"Level {level}, cell {row}: parent index {parents[row]} must be {allowed}.")
            counts = np.asarray(table["counts"], dtype=np.int64).reshape(-1)
            if len(counts) != expected or (counts < 0).any():
                raise ValueError(f"Level {level}: counts must be {expected} integers >= 0.")
            levels.append({
                "cell_ids": torch.tensor([s2_token_to_id(token) for token in tokens], dtype=torch.long),
                "centroids": to_microdegrees(coordinates),
                "parents": torch.from_numpy(parents),
                "counts": torch.from_numpy(counts),
            })
        for level, values in enumerate(levels):
            for name, value in values.items():
                self.cell_table.get(name, level).copy_(value)
        self.config.has_cell_table = True

    def check_loaded_state(self, require_hashes: bool = True) -> None:
        """Check a loaded cell table as `set_cell_table` checks a new one (called by `from_pretrained`): centroids
        in range, parents rows of the level above, counts >= 0, valid S2 ids.

        Raises:
            ValueError: naming the level and cell.
        """
        if self.config.has_cell_table:
            try:
                self.set_cell_table(self.get_cell_table())
            except ValueError as error:
                raise ValueError(f"The checkpoint's cell table is invalid: {error}") from None

    def get_cell_table(self) -> list[dict]:
        """The stored cell table in the form `set_cell_table` takes (numpy arrays, tokens as strings)."""
        table = []
        for level in range(self.config.num_levels):
            centroids = from_microdegrees(self.cell_table.get("centroids", level).cpu()).numpy()
            table.append({
                "tokens": [s2_id_to_token(i) for i in self.cell_table.get("cell_ids", level).tolist()],
                "latitudes": centroids[:, 0],
                "longitudes": centroids[:, 1],
                "parents": self.cell_table.get("parents", level).cpu().numpy(),
                "counts": self.cell_table.get("counts", level).cpu().numpy(),
            })
        return table

    def _require_cell_table(self) -> None:
        if not self.config.has_cell_table:
            raise ValueError("This GeoHier model has no cell table: call model.set_cell_table(cells) first.")

    def hierarchical_probabilities(self, logits: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The paper's hierarchical scores, normalised: a distribution over the cells of each level.

        Level 0 is its softmax. At level l, each cell's softmax probability is multiplied by its parent's
        probability (the paper's product, which ranks the cells) and the products are divided by their sum over
        the level, so that each level's probabilities sum to 1 (the raw product does not: its sum is the expected
        agreement of the levels, e.g. 0.0005 for an untrained model). The ranking is the paper's.

        Args:
            logits: one `(B, cells_per_level[l])` tensor per level, coarse to fine.

        Returns: one `(B, cells_per_level[l])` float32 tensor per level, each row summing to 1.
        """
        self._require_cell_table()
        probabilities = []
        for level, level_logits in enumerate(logits):
            level_probabilities = level_logits.float().softmax(dim=-1)
            if level:
                parents = self.cell_table.get("parents", level).to(level_logits.device)
                product = level_probabilities * probabilities[-1][:, parents]
                level_probabilities = product / product.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(product.dtype).tiny)
            probabilities.append(level_probabilities)
        return tuple(probabilities)

    @torch.no_grad()
    def geolocate(
        self,
        pixel_values: torch.Tensor | None = None,
        top_k: int = 5,
        backbone_hidden_states: torch.Tensor | None = None,
        output_attentions: bool = False,
        num_crops: int = 1,
    ) -> GeoHierGeolocationOutput:
        """The `top_k` most probable fine cells of each image, at their centroids, using the predicted scene.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(B * num_crops, 3, H, W)`), or backbone_hidden_states
                (`(B * num_crops, T, vision_hidden_size)`).
            top_k (`int`): predictions per image, 1 <= top_k <= number of fine cells.
            output_attentions (`bool`): also return the decoder's cross-attention maps (same forward pass).
            num_crops (`int`): crops per image, consecutive (e.g. 10 from `GeoHierImageProcessor.ten_crop`): each
                level's logits and the scene logits are averaged over an image's crops before the softmax and the
                hierarchical product, as GeoGuessNet's evaluation (`eval_images_weighted`) does.

        Returns: [`GeoHierGeolocationOutput`]: `latitudes`, `longitudes`, `probabilities`, `indices`, each
        `(B, top_k)` best first, plus `level_probabilities`, `scene_probabilities`, `selected_scenes` and, with
        `output_attentions`, `cross_attentions`.
        """
        top_k = check_top_k(top_k, self.config.cells_per_level[-1])
        self._require_cell_table()
        inputs = pixel_values if pixel_values is not None else backbone_hidden_states
        if isinstance(num_crops, bool) or not isinstance(num_crops, int) or num_crops < 1:
            raise ValueError(f"num_crops must be a positive integer, got {num_crops!r}.")
        if inputs is not None and len(inputs) % num_crops:
            raise ValueError(f"{len(inputs)} inputs are not a whole number of images of num_crops={num_crops} crops.")
        if num_crops > 1 and output_attentions:
            raise ValueError("output_attentions needs one crop per image (num_crops=1).")
        output = self(
            pixel_values=pixel_values,
            backbone_hidden_states=backbone_hidden_states,
            output_attentions=output_attentions,
        )
        if num_crops > 1:
            output.logits = tuple(logits.unflatten(0, (-1, num_crops)).mean(dim=1) for logits in output.logits)
            output.scene_logits = output.scene_logits.unflatten(0, (-1, num_crops)).mean(dim=1)
            output.selected_scenes = output.scene_logits.argmax(dim=1)
        level_probabilities = self.hierarchical_probabilities(output.logits)
        probabilities, indices = level_probabilities[-1].topk(top_k, dim=1)
        fine = self.config.num_levels - 1
        coordinates = from_microdegrees(self.cell_table.get("centroids", fine).to(indices.device)[indices])
        check_finite_answer(probabilities=probabilities, scene_logits=output.scene_logits)
        return GeoHierGeolocationOutput(
            latitudes=coordinates[..., 0],
            longitudes=coordinates[..., 1],
            probabilities=probabilities,
            indices=indices,
            level_probabilities=level_probabilities,
            scene_probabilities=output.scene_logits.float().softmax(dim=-1),
            selected_scenes=output.selected_scenes,
            cross_attentions=output.cross_attentions,
        )


__all__ = [
    "GeoHierCellTable",
    "GeoHierDecoderLayer",
    "GeoHierGeolocationOutput",
    "GeoHierModel",
    "GeoHierOutput",
    "GeoHierPreTrainedModel",
    "s2_id_to_token",
    "s2_token_to_id",
]
