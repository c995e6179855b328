"""Named model configurations: the one home of the tiny configs used by tests, the CPU benchmarks and
`geoloc.training.train --model-config tiny`, and of the offline byte-level tokenizer that matches them."""

from transformers import CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

from modeling_geoclip import GeoCLIPConfig, GeoCLIPImageProcessor, GeoCLIPLocationEncoderConfig
from modeling_geohier import GeoHierConfig, GeoHierImageProcessor

TINY_IMAGE_SIZE = 32


def tiny_clip_configs() -> tuple[CLIPVisionConfig, CLIPTextConfig]:
    """A random CLIP pair small enough for CPU tests: 32x32 images, 8x8 patches, a byte-level vocabulary
    (matching `byte_level_clip_tokenizer`)."""
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE, patch_size=8, projection_dim=64,
    )
    text = CLIPTextConfig(
        vocab_size=514, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        projection_dim=64, max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513,
    )
    return vision, text


def byte_level_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer with a byte-level vocabulary and no merges (514 tokens), for tiny models and tests
    that must run offline. Real checkpoints ship the OpenAI CLIP tokenizer instead."""
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_geoclip_config(**overrides) -> GeoCLIPConfig:
    """Tiny GeoCLIP: the official architecture (3 sigmas, 3-layer capsules) at toy widths."""
    vision, text = tiny_clip_configs()
    options = dict(
        vision_config=vision,
        text_config=text,
        location_config=GeoCLIPLocationEncoderConfig(rff_dim=64, hidden_size=128, projection_dim=64),
        image_mlp_hidden_size=128,
        queue_size=256,
        backbone="random-tiny-clip",
    )
    options.update(overrides)
    return GeoCLIPConfig(**options)


def tiny_geohier_config(**overrides) -> GeoHierConfig:
    """Tiny GeoHier: the tiny CLIP vision tower as backbone, 4 scenes x 3 levels of (8, 16, 32) cells, N=2, E=1,
    a decoder of width 64 (the tower's; at width 32 the world-map crops' median error was 1.6x worse).

    The decoder's linear layers start with std 0.15 (of the order of 1 / sqrt(hidden_size)) instead of the
    paper-scale 0.02: at this width a std of 0.02 shrinks every projection's output several times over, so the
    image tokens barely reached the queries and the tiny model stayed at chance on the world-map crops."""
    vision, _ = tiny_clip_configs()
    options = dict(
        vision_config=vision,
        num_scenes=4,
        cells_per_level=[8, 16, 32],
        num_independent_layers=2,
        num_dependent_layers=1,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        initializer_range=0.15,
    )
    options.update(overrides)
    return GeoHierConfig(**options)


def tiny_image_processor(model_type: str = "geoclip"):
    """The image processor of the tiny configs (resize and centre-crop to 32 px, CLIP normalisation), of the
    model family's own class: `GeoCLIPImageProcessor` for `"geoclip"`, `GeoHierImageProcessor` for `"geohier"`."""
    processor_class = {"geoclip": GeoCLIPImageProcessor, "geohier": GeoHierImageProcessor}[model_type]
    return processor_class(size={"shortest_edge": TINY_IMAGE_SIZE},
                           crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
