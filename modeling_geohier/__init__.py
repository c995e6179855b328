"""GeoHier (the GeoDecoder of Clark et al., CVPR 2023) as a transformers model. Importing this package registers
nothing: `geoloc.models.register_models()` registers it with `AutoConfig`, `AutoModel` and `AutoImageProcessor`.

API for training and inference code:

- `GeoHierModel(config)(pixel_values=(B, 3, H, W), labels=(B, num_levels) long, scene_labels=(B,) long or None)`
  -> `GeoHierOutput`: `.loss` (weighted label-smoothed CE per level + scene CE when scene labels are given; -1
  labels are ignored), `.logits` (tuple per level, coarse to fine, each `(B, cells_per_level[l])`),
  `.scene_logits` `(B, num_scenes)`, `.selected_scenes` `(B,)`, and with `output_attentions=True`
  `.cross_attentions` `(B, N + E, heads, num_queries, tokens)`. `backbone_hidden_states=(B, T, vision_hidden)`
  replaces `pixel_values` when the encoder's tokens are cached (frozen backbone).
- Labels come from `geoloc.geography.geocells.build_geocells(latitudes, longitudes)` -> `(cells, labels)`; build the
  config with `cells_per_level=[len(level["tokens"]) for level in cells]` and call `model.set_cell_table(cells)`
  before saving, so the checkpoint can geolocate.
- `model.geolocate(pixel_values, top_k=5)` -> `GeoHierGeolocationOutput` with `latitudes`, `longitudes`,
  `probabilities`, `indices` (each `(B, top_k)`, best first), `level_probabilities`, `scene_probabilities`,
  `selected_scenes`, and with `output_attentions=True` the same forward pass's `cross_attentions`.
  `GeoHierImageProcessor.ten_crop(images)` + `geolocate(pixel_values, num_crops=10)` answers from the average of
  each image's ten crops' logits (GeoGuessNet's ten-crop evaluation).
- `GeoHierModel.from_pretrained` is strict: missing, unexpected or wrongly shaped weights (cell table included)
  raise `ValueError`; `strict=False` loads a partial checkpoint.
"""

from .configuration_geohier import MP16_CELLS_PER_LEVEL, GeoHierConfig
from .image_processing_geohier import GeoHierImageProcessor
from .modeling_geohier import GeoHierGeolocationOutput, GeoHierModel, GeoHierOutput, GeoHierPreTrainedModel

__all__ = [
    "GeoHierConfig",
    "GeoHierGeolocationOutput",
    "GeoHierImageProcessor",
    "GeoHierModel",
    "GeoHierOutput",
    "GeoHierPreTrainedModel",
    "MP16_CELLS_PER_LEVEL",
]
