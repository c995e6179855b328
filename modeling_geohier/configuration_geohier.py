"""Configuration of GeoHier, the GeoDecoder of Clark et al., "Where We Are and What We're Looking At: Query
Based Worldwide Image Geo-localization Using Hierarchies and Scenes" (CVPR 2023)."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# The MP-16 partitions of Müller-Budack et al. (ECCV 2018), tau = (50, 5000), (50, 2000), (50, 1000).
MP16_CELLS_PER_LEVEL = (3298, 7202, 12893)
# The image encoders GeoHier can sit on: their `last_hidden_state` is the sequence of image tokens.
SUPPORTED_BACKBONES = ("vit", "clip_vision_model")
# Level loss weights for three levels, coarse to fine (the co-author's code, AHKerrigan/GeoGuessNet lit.py).
PAPER_LEVEL_LOSS_WEIGHTS = (0.5, 0.3, 0.2)
SCENE_SELECTIONS = ("predicted", "label")


@strict
class GeoHierConfig(PreTrainedConfig):
    r"""
    Configuration of [`GeoHierModel`]: an image encoder, one learned query per (scene, hierarchy level) pair,
    `num_independent_layers` decoder layers over all queries, `num_dependent_layers` layers whose self-attention
    and FFN are restricted to one hierarchy level, a scene head and one cell classifier per level.

    Args:
        vision_config (`ViTConfig`, `CLIPVisionConfig` or `dict`, defaults to ViT-B/16 at 224 px):
            The image encoder. A dict is resolved by its `model_type` (`"vit"` or `"clip_vision_model"`).
        num_scenes (`int`, defaults to 16):
            Number of scene types (the 16 Places365 "IO hierarchy" classes in the paper; GeoGuessNet `networks.py`
            GeoGuess1: queries of shape (16, 3, 768), i.e. 48 queries, trained on MP-16's `S16_Label`).
        cells_per_level (`list[int]`, defaults to `[3298, 7202, 12893]`):
            Number of geocells of each hierarchy level, coarse to fine. Must match the cell table
            (`GeoHierModel.set_cell_table`).
        num_independent_layers (`int`, defaults to 6):
            N: decoder layers in which every query attends to every other query (6 in GeoGuessNet `networks.py`
            GeoGuess1: `CustomTransformer1(768, 6, 12, 64, 1024)`, whose layers, unlike these, do not feed each other).
        num_dependent_layers (`int`, defaults to 2):
            E: decoder layers whose self-attention is masked to the queries of the same level and which have one
            FFN per level. The value 2 is unconfirmed: the paper names E without a value in the text available to
            us, and GeoGuess1 has no such layers.
        hidden_size (`int`, defaults to 768):
            Width of the queries; the image tokens are projected to it.
        num_attention_heads (`int`, defaults to 12):
            Heads of every self- and cross-attention; must divide `hidden_size`.
        intermediate_size (`int`, defaults to 1024):
            Hidden width of the decoder FFNs (1024 in the authors' code).
        dropout (`float`, defaults to 0.1):
            Dropout on attention weights and after every residual branch (GeoGuess1's decoder uses 0.0).
        layer_norm_eps (`float`, defaults to 1e-5):
            Epsilon of the decoder LayerNorms.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the decoder's linear weights (the queries start from N(0, 1), as DETR's).
        label_smoothing (`float`, defaults to 0.1):
            Label smoothing of the per-level cell cross-entropies (0.1 in the authors' code).
        scene_label_smoothing (`float`, defaults to 0.0):
            Label smoothing of the scene cross-entropy (GeoGuessNet's `main.py` path smooths it by 0.1 too, its
            `lit.py` does not; the `geodecoder-paper` recipe sets 0.1).
        level_loss_weights (`list[float]`, *optional*):
            Weight of each level's cross-entropy, coarse to fine. Default (`None`): `[0.5, 0.3, 0.2]` for three
            levels (the co-author's GeoGuessNet `lit.py`; its `main.py` path, which the `geodecoder-paper` recipe
            follows, weighs them equally), `1 / (l + 1)` normalised to sum to 1 for any other number of levels
            (coarse levels weigh more, as in `lit.py`).
        scene_loss_weight (`float`, defaults to 1.0):
            Weight of the scene cross-entropy (used only when scene labels are given).
        scene_selection (`str`, defaults to `"predicted"`):
            Whose queries are classified in `forward` when scene labels are given (in training): `"predicted"`, the
            scene the model predicts (as at inference, and as in the co-author's code), or `"label"`, the labelled
            scene (teacher forcing). Inference always uses the predicted scene.
        trained_with_scene_labels (`bool`, defaults to `False`):
            Whether the checkpoint was trained with scene labels, i.e. whether its scene predictions mean anything
            (set by `geoloc train`; front ends show scenes only then).
        freeze_backbone (`bool`, defaults to `False`):
            Keep the image encoder frozen (the paper fine-tunes it end to end).
        id2scene (`dict[int, str]`, *optional*):
            The name of each scene id (0 .. num_scenes-1), e.g. Places365's "indoor" / "natural" / "urban"; front ends
            show scenes by these names (`geoloc train` takes them from a `ClassLabel` scene column).
        has_cell_table (`bool`, defaults to `False`):
            Whether the checkpoint holds a cell table (set by `GeoHierModel.set_cell_table`); `geolocate` needs it.

    Example:

    ```python
    >>> from modeling_geohier import GeoHierConfig, GeoHierModel
    >>> config = GeoHierConfig()  # the paper's shape: ViT-B/16, 16 scenes x 3 levels = 48 queries
    >>> config.num_queries
    48
    ```"""

    model_type = "geohier"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    num_scenes: int = 16
    cells_per_level: list[int] | tuple[int, ...] = MP16_CELLS_PER_LEVEL
    num_independent_layers: int = 6
    num_dependent_layers: int = 2
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 1024
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    label_smoothing: float = 0.1
    scene_label_smoothing: float = 0.0
    level_loss_weights: list[float] | tuple[float, ...] | None = None
    scene_loss_weight: float = 1.0
    scene_selection: str = "predicted"
    trained_with_scene_labels: bool = False
    freeze_backbone: bool = False
    has_cell_table: bool = False
    id2scene: dict | None = None

    def validate_architecture(self):
        if self.vision_config.model_type not in SUPPORTED_BACKBONES:
            raise ValueError(
                f"vision_config must be one of {SUPPORTED_BACKBONES} (ViTConfig or CLIPVisionConfig), "
                f"got model_type={self.vision_config.model_type!r}."
            )
        cells = list(self.cells_per_level)
        if len(cells) == 0 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in cells):
            raise ValueError(
                f"cells_per_level must be a non-empty list of positive integers (cells of each level, coarse to "
                f"fine), got {self.cells_per_level!r}."
            )
        if self.level_loss_weights is not None and len(self.level_loss_weights) != len(cells):
            raise ValueError(
                f"level_loss_weights has {len(self.level_loss_weights)} entries but cells_per_level has "
                f"{len(cells)} levels: give one weight per level, or None for the default."
            )
        if any(not float(w) >= 0 for w in self.loss_weights) or not float(self.scene_loss_weight) >= 0:
            raise ValueError(
                f"loss weights must be >= 0, got level_loss_weights={self.level_loss_weights!r}, "
                f"scene_loss_weight={self.scene_loss_weight!r}."
            )
        for name in ("num_scenes", "hidden_size", "num_attention_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("num_independent_layers", "num_dependent_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.id2scene is not None:
            ids = set()
            for key, name in self.id2scene.items():
                if not str(key).isdigit() or int(key) >= self.num_scenes or not isinstance(name, str) or not name.strip():
                    raise ValueError(f"id2scene maps scene ids 0..{self.num_scenes - 1} to non-empty names, got "
                                     f"{key!r}: {name!r}.")
                ids.add(int(key))
            if len(ids) != len(self.id2scene):
                raise ValueError(f"id2scene names a scene id twice: {sorted(self.id2scene)}.")
        if self.scene_selection not in SCENE_SELECTIONS:
            raise ValueError(f"scene_selection must be one of {SCENE_SELECTIONS}, got {self.scene_selection!r}.")
        if not all(0 <= value < 1 for value in (self.dropout, self.label_smoothing, self.scene_label_smoothing)):
            raise ValueError(
                f"dropout, label_smoothing and scene_label_smoothing must be in [0, 1), got {self.dropout}, "
                f"{self.label_smoothing} and {self.scene_label_smoothing}."
            )

    @property
    def num_levels(self) -> int:
        """Number of hierarchy levels (3 in the paper: coarse, middle, fine)."""
        return len(self.cells_per_level)

    @property
    def loss_weights(self) -> tuple[float, ...]:
        """The weight of each level's cross-entropy (`level_loss_weights`, or the default it describes)."""
        if self.level_loss_weights is not None:
            return tuple(float(weight) for weight in self.level_loss_weights)
        if self.num_levels == len(PAPER_LEVEL_LOSS_WEIGHTS):
            return PAPER_LEVEL_LOSS_WEIGHTS
        harmonic = [1 / (level + 1) for level in range(self.num_levels)]
        return tuple(weight / sum(harmonic) for weight in harmonic)

    @property
    def num_queries(self) -> int:
        """One query per (scene, level) pair: `num_scenes * num_levels`."""
        return self.num_scenes * self.num_levels


__all__ = ["GeoHierConfig", "MP16_CELLS_PER_LEVEL", "PAPER_LEVEL_LOSS_WEIGHTS", "SCENE_SELECTIONS", "SUPPORTED_BACKBONES"]
