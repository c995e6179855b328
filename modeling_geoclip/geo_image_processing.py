"""Image decoding and preprocessing shared by every model of this package (PIL backend, no torchvision).

`load_image` turns whatever a user has (a path, bytes, a numpy array, a PIL image) into an upright RGB
PIL image, or raises a `ValueError` that names the input. `GeoImageProcessor` is CLIP's PIL image
processor with that decoding in front, so odd files never reach a model.

The single source is `modeling_geoclip/geo_image_processing.py`; `modeling_geohier/geo_image_processing.py` is
a generated copy (each model folder is pushed to the Hub alone as remote code). Edit the source, then run
`python geoloc/remote_code.py --sync`; `tests/test_remote_code.py` fails while a copy differs.
"""

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import CLIPImageProcessorPil

# Pillow raises DecompressionBombError above 2 * MAX_IMAGE_PIXELS (~179 Mpx); we refuse anything above it.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
ORIENTATION_TAG = 0x0112  # EXIF Orientation


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha is composited on white, 16/32-bit greyscale is rescaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def load_image(source) -> Image.Image:
    """Decode one image into an upright RGB PIL image.

    Args:
        source: a file path, raw bytes, a PIL image, or a numpy array of shape (H, W), (H, W, 3) or
            (H, W, 4) (uint8, or floats in [0, 1]).

    Raises:
        ValueError: naming the input when it is missing, empty, truncated, not an image, or larger than
            `MAX_IMAGE_PIXELS` (a decompression bomb).

    Example:
        >>> load_image(np.zeros((8, 8, 3), dtype=np.uint8)).size
        (8, 8)
    """
    name = _describe(source)
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        array = source
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)) or array.size == 0:
            raise ValueError(f"Image array {name} must have shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}.")
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[..., 0]
        if array.dtype.kind == "f":
            if not np.isfinite(array).all():
                raise ValueError(f"Image array {name} contains NaN or inf.")
            array = np.clip(array, 0, 1) * 255
        elif array.dtype == np.uint16 and array.ndim == 2:
            array = array.astype(np.int32)  # 16-bit greyscale: rescaled to 8 bits like PIL's I;16 below
        elif array.dtype not in (np.uint8, np.bool_):
            raise ValueError(
                f"Image array {name} has dtype {array.dtype}: pass uint8, floats in [0, 1], or 2-D uint16."
            )
        image = Image.fromarray(np.ascontiguousarray(array if array.dtype.kind == "i" else array.astype(np.uint8)))
    elif isinstance(source, (str, os.PathLike, bytes, bytearray)):
        if isinstance(source, (str, os.PathLike)):
            if not os.path.isfile(source):
                raise ValueError(f"Image file {name} does not exist.")
            if os.path.getsize(source) == 0:
                raise ValueError(f"Image file {name} is empty.")
        elif len(source) == 0:
            raise ValueError("Image bytes are empty.")
        stream = source if isinstance(source, (str, os.PathLike)) else io.BytesIO(source)
        try:
            with warnings.catch_warnings(), Image.open(stream) as opened:
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                opened.load()  # the pixels stay in memory when the file is closed (multi-frame files: frame 0)
                image = opened
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError(f"Image {name} is too large (more than {MAX_IMAGE_PIXELS} pixels).") from None
        except UnidentifiedImageError:
            raise ValueError(f"{name} is not an image file Pillow can read.") from None
        except (OSError, SyntaxError) as error:
            raise ValueError(f"Image {name} is truncated or corrupt: {error}") from None
    else:
        raise ValueError(f"Cannot read an image from {name}: pass a path, bytes, a PIL image or a numpy array.")
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ValueError(f"Image {name} is too large ({image.width}x{image.height} > {MAX_IMAGE_PIXELS} pixels).")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"Image {name} has no pixels.")
    if image.mode == "RGB" and image.getexif().get(ORIENTATION_TAG, 1) == 1:
        return image  # already upright RGB (e.g. decoded earlier in the pipeline): no copies
    return _to_rgb(ImageOps.exif_transpose(image))


class GeoImageProcessor(CLIPImageProcessorPil):
    """CLIP's PIL image processor, accepting paths, bytes, numpy arrays and PIL images of any mode (decoded by
    `load_image`). Each model subclasses it under its own name, which its checkpoints record.

    Example:
        >>> processor = GeoImageProcessor()
        >>> processor(np.zeros((300, 400, 3), dtype=np.uint8), return_tensors="pt").pixel_values.shape
        torch.Size([1, 3, 224, 224])
    """

    def preprocess(self, images, *args, **kwargs):
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("No images given: the batch is empty.")
        return super().preprocess([load_image(image) for image in images], *args, **kwargs)


__all__ = ["GeoImageProcessor", "MAX_IMAGE_PIXELS", "load_image"]
