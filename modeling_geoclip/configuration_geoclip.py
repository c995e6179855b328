"""Configurations of GeoCLIP (Vivanco Cepeda et al., NeurIPS 2023) and of its location encoder."""

import math

from huggingface_hub.dataclasses import strict
from transformers import CLIPTextConfig, CLIPVisionConfig, PreTrainedConfig

OFFICIAL_SIGMAS = [2.0**0, 2.0**4, 2.0**8]
OFFICIAL_BACKBONE = "openai/clip-vit-large-patch14"


@strict
class GeoCLIPLocationEncoderConfig(PreTrainedConfig):
    r"""
    Configuration of [`GeoCLIPLocationEncoder`]: GPS (lat, lon) -> Equal Earth projection -> random Fourier
    features at each sigma -> one MLP "capsule" per sigma -> embeddings summed over capsules.

    Args:
        sigmas (`list[float]`, defaults to `[1, 16, 256]`):
            Standard deviations of the random Fourier feature matrices, one capsule per sigma.
        rff_dim (`int`, defaults to 256):
            Number of random frequencies per capsule; the encoding has `2 * rff_dim` features (cos, sin).
        hidden_size (`int`, defaults to 1024):
            Width of each capsule's MLP.
        num_hidden_layers (`int`, defaults to 3):
            Number of Linear+ReLU layers in each capsule before its head.
        projection_dim (`int`, defaults to 512):
            Size of the location embedding (the shared image/location space).

    Example:

    ```python
    >>> from modeling_geoclip import GeoCLIPLocationEncoderConfig, GeoCLIPLocationEncoder
    >>> encoder = GeoCLIPLocationEncoder(GeoCLIPLocationEncoderConfig(hidden_size=64, projection_dim=32))
    ```"""

    model_type = "geoclip_location_encoder"
    base_config_key = "location_config"

    sigmas: list[float] | tuple[float, ...] = tuple(OFFICIAL_SIGMAS)
    rff_dim: int = 256
    hidden_size: int = 1024
    num_hidden_layers: int = 3
    projection_dim: int = 512

    def validate_architecture(self):
        if len(self.sigmas) == 0 or any(not (float(s) > 0) for s in self.sigmas):
            raise ValueError(f"sigmas must be a non-empty list of positive numbers, got {self.sigmas!r}.")
        for name in ("rff_dim", "hidden_size", "num_hidden_layers", "projection_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")


@strict
class GeoCLIPConfig(PreTrainedConfig):
    r"""
    Configuration of [`GeoCLIPModel`].

    Args:
        vision_config (`CLIPVisionConfig` or `dict`):
            The CLIP image tower. Its `projection_dim` is the size of CLIP's image embedding (768 for ViT-L/14).
        text_config (`CLIPTextConfig` or `dict`):
            The CLIP text tower for text queries (its `projection_dim` must equal the image tower's).
        location_config (`GeoCLIPLocationEncoderConfig` or `dict`):
            The GPS encoder.
        image_mlp_hidden_size (`int`, defaults to 768):
            Hidden width of the trainable MLP that maps CLIP embeddings into the location space.
        logit_scale_init_value (`float`, defaults to log(1/0.07)):
            Initial value of the learnable log temperature.
        queue_size (`int`, defaults to 4096):
            Number of past GPS coordinates kept as extra negatives for the contrastive loss.
        gallery_size (`int`, defaults to 0):
            Number of GPS points in the retrieval gallery stored with the model (kept in sync by `set_gallery`).
        gallery_backend (`str`, defaults to `"exact"`):
            How the gallery is searched: `"exact"` (chunked brute force) or `"faiss"` (a FAISS index, needs
            `pip install faiss-cpu`). Set by `set_gallery`.
        gallery_options (`dict`, *optional*):
            The backend's resolved options (see `modeling_geoclip.gallery_geoclip.resolve_gallery_options`).
            Set by `set_gallery`.
        gallery_index_nbytes (`int`, defaults to 0):
            Size of the serialised FAISS index stored with the model (0 for the exact backend). Set by
            `set_gallery`.
        gallery_index_sha256 (`str`, *optional*):
            Hex SHA-256 of the serialised FAISS index (None for the exact backend). Set by `set_gallery`;
            `from_pretrained` refuses an index whose bytes do not match it.
        use_text_tower (`bool`, defaults to `True`):
            Build the text tower; `False` gives an image-only model (no `get_text_features`).
        text_aligned (`bool`, defaults to `True`):
            Whether text queries mean something: the text tower's embeddings are aligned with the image tower's
            (CLIP pretraining, image tower frozen since, as in the paper). `geoloc train` sets `False` for random
            towers or a trained image tower; front ends then offer no text mode (`Capabilities.text_aligned`).
        freeze_backbone (`bool`, defaults to `True`):
            Keep the CLIP towers frozen during training, as the paper does.
        backbone (`str` or `None`, defaults to `"openai/clip-vit-large-patch14"`):
            Hub id of the CLIP checkpoint the towers come from (informational, used by the converter); None when
            unknown or local (a published model never names a local folder).

    Example:

    ```python
    >>> from modeling_geoclip import GeoCLIPConfig, GeoCLIPModel
    >>> config = GeoCLIPConfig()  # the official ViT-L/14 shape
    ```"""

    model_type = "geoclip"
    sub_configs_defaults = {
        "vision_config": CLIPVisionConfig,
        "text_config": CLIPTextConfig,
        "location_config": GeoCLIPLocationEncoderConfig,
    }

    vision_config: dict | CLIPVisionConfig | None = None
    text_config: dict | CLIPTextConfig | None = None
    location_config: dict | GeoCLIPLocationEncoderConfig | None = None
    image_mlp_hidden_size: int = 768
    logit_scale_init_value: float = math.log(1 / 0.07)
    queue_size: int = 4096
    gallery_size: int = 0
    gallery_backend: str = "exact"
    gallery_options: dict | None = None
    gallery_index_nbytes: int = 0
    gallery_index_sha256: str | None = None
    use_text_tower: bool = True
    text_aligned: bool = True
    freeze_backbone: bool = True
    backbone: str | None = OFFICIAL_BACKBONE

    def __post_init__(self, **kwargs):
        # Defaults reproduce the official model: CLIP ViT-L/14 towers (projection 768).
        if self.vision_config is None:
            self.vision_config = CLIPVisionConfig(
                hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                patch_size=14, image_size=224, projection_dim=768,
            )
        if self.text_config is None:
            self.text_config = CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                projection_dim=768,
            )
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if self.use_text_tower and self.text_config.projection_dim != self.vision_config.projection_dim:
            raise ValueError(
                f"text_config.projection_dim ({self.text_config.projection_dim}) must equal "
                f"vision_config.projection_dim ({self.vision_config.projection_dim}): both towers feed one MLP."
            )
        if self.gallery_backend not in ("exact", "faiss"):
            raise ValueError(f"gallery_backend must be 'exact' or 'faiss', got {self.gallery_backend!r}.")
        if self.queue_size < 0 or self.gallery_size < 0:
            raise ValueError(f"queue_size and gallery_size must be >= 0, got {self.queue_size}, {self.gallery_size}.")

    @property
    def projection_dim(self) -> int:
        """Size of the shared image/location embedding space."""
        return self.location_config.projection_dim


__all__ = ["GeoCLIPConfig", "GeoCLIPLocationEncoderConfig", "OFFICIAL_BACKBONE", "OFFICIAL_SIGMAS"]
