"""GeoCLIP's image processor and the offline test tokenizer.

Decoding (`load_image`) and CLIP-style preprocessing live in `geo_image_processing`, shared with GeoHier;
`GeoCLIPImageProcessor` is that processor under GeoCLIP's name, which GeoCLIP checkpoints record.
"""

from transformers import CLIPTokenizer

from .geo_image_processing import MAX_IMAGE_PIXELS, GeoImageProcessor, load_image


class GeoCLIPImageProcessor(GeoImageProcessor):
    """CLIP's PIL image processor, accepting paths, bytes, numpy arrays and PIL images of any mode.

    Example:
        >>> import numpy as np
        >>> processor = GeoCLIPImageProcessor()
        >>> processor(np.zeros((300, 400, 3), dtype=np.uint8), return_tensors="pt").pixel_values.shape
        torch.Size([1, 3, 224, 224])
    """


def byte_level_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer with a byte-level vocabulary and no merges (514 tokens), for tiny models and tests
    that must run offline. Real checkpoints ship the OpenAI CLIP tokenizer instead."""
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


__all__ = ["GeoCLIPImageProcessor", "MAX_IMAGE_PIXELS", "byte_level_clip_tokenizer", "load_image"]
