"""Image decoding and preprocessing shared by every model of this package (PIL backend, no torchvision).

`load_image` turns whatever a user has (a path, bytes, a numpy array, a PIL image) into an upright RGB
PIL image, or raises a `ValueError` that names the input. `GeoImageProcessor` is CLIP's PIL image
processor with that decoding in front, so odd files never reach a model.

The single source is `geo_core/geo_image_processing.py`; `modeling_geoclip/` and `modeling_geohier/` hold
a generated copy (each model folder is pushed to the Hub alone as remote code). Edit the source, then run
`python geoloc/hub/remote_code.py --sync`; `tests/test_remote_code.py` fails while a copy differs.
"""

import io
import os
import warnings

import numpy as np
from PIL import BmpImagePlugin, IcoImagePlugin, Image, ImageOps, PngImagePlugin, UnidentifiedImageError
from transformers import CLIPImageProcessorPil

# Images above this many pixels are refused from their header, before any pixel is decoded: 8192 x 8192 (64 Mpx,
# 256 MB as RGBA; a 50 Mpx camera photo passes). Per processor: its `max_image_pixels`.
# Pillow's own guard (`PIL.Image.MAX_IMAGE_PIXELS`) still refuses anything above twice its limit (~179 Mpx).
MAX_IMAGE_PIXELS = 8192 * 8192
ORIENTATION_TAG = 0x0112  # EXIF Orientation


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha is composited on white, 16/32-bit greyscale is rescaled. Peak memory
    stays a few bytes per pixel (a 64 Mpx 16-bit or palette PNG: well under 1 GB)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = Image.fromarray(_rescaled_to_uint8(image), mode="L")
    if image.mode == "P" and "transparency" not in image.info:
        return image.convert("RGB")  # no alpha to composite: skip the 4-byte RGBA copy
    if image.mode in ("P", "RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGB"), mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def _rescaled_to_uint8(image: Image.Image) -> np.ndarray:
    """A 16/32-bit greyscale image's values mapped linearly onto 0..255, a block of rows at a time (a float64
    copy of a whole 64 Mpx image would take 512 MB)."""
    array = np.asarray(image)
    low, high = float(array.min()), float(array.max())
    scale = 255 / (high - low) if high > low else 0.0
    out = np.empty(array.shape, dtype=np.uint8)
    rows = max(1, (1 << 20) // max(1, array.shape[1]))
    for start in range(0, array.shape[0], rows):
        block = (array[start : start + rows].astype(np.float64) - low) * scale
        out[start : start + rows] = block.round()
    return out


def _check_size(width: int, height: int, name: str, max_pixels: int, resize_edge: int | None = None) -> None:
    """Refuse an image by its declared size (read from the header, before decoding), and by the size the image
    processor would resize it to: its short edge goes to `resize_edge` pixels, so a very thin image (64 x 1M)
    would balloon (224 x 3.7M = 822 Mpx) past the same `max_pixels` budget."""
    if width == 0 or height == 0:
        raise ValueError(f"Image {name} has no pixels.")
    if width * height > max_pixels:
        raise ValueError(
            f"Image {name} is too large: {width}x{height} = {width * height} pixels, above the limit of "
            f"{max_pixels} pixels (max_image_pixels of the image processor)."
        )
    if resize_edge:
        short, long = sorted((width, height))
        resized = resize_edge * int(resize_edge * long / short)
        if resized > max_pixels:
            raise ValueError(
                f"Image {name} is too elongated: {width}x{height} would be resized to {resized} pixels (short edge "
                f"{resize_edge}), above the limit of {max_pixels} pixels (max_image_pixels of the image processor); "
                f"aspect ratios up to {max_pixels // resize_edge ** 2}:1 are allowed."
            )


def _from_array(array: np.ndarray, name: str, max_pixels: int, resize_edge: int | None) -> Image.Image:
    """A PIL image from an (H, W), (H, W, 1/3/4) uint8/bool/2-D uint16 array or floats in [0, 1]."""
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)) or array.size == 0:
        raise ValueError(f"Image array {name} must have shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}.")
    _check_size(array.shape[1], array.shape[0], name, max_pixels, resize_edge)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ValueError(f"Image array {name} contains NaN or inf.")
        array = np.clip(array, 0, 1) * 255
    elif array.dtype == np.uint16 and array.ndim == 2:
        array = array.astype(np.int32)  # 16-bit greyscale: rescaled to 8 bits like PIL's I;16 in `_to_rgb`
    elif array.dtype not in (np.uint8, np.bool_):
        raise ValueError(f"Image array {name} has dtype {array.dtype}: pass uint8, floats in [0, 1], or 2-D uint16.")
    return Image.fromarray(np.ascontiguousarray(array if array.dtype.kind == "i" else array.astype(np.uint8)))


def _check_ico_frames(source, name: str, max_pixels: int, resize_edge: int | None) -> None:
    """Pillow decodes an ICO's largest frame while *opening* it, at the size the embedded PNG or BMP declares,
    whatever the directory says (16x16 may hold 13000x13000): read every frame's own header first."""
    with open(source, "rb") if isinstance(source, (str, os.PathLike)) else io.BytesIO(source) as stream:
        if stream.read(4) != IcoImagePlugin._MAGIC:
            return
        stream.seek(0)
        try:
            sizes = [_ico_frame_size(stream, entry.offset) for entry in IcoImagePlugin.IcoFile(stream).entry]
        except MemoryError:
            raise
        except Exception as error:
            raise ValueError(f"Image {name} is truncated or corrupt ({type(error).__name__}: {error}).") from None
    for width, height in sizes:
        _check_size(width, height, name, max_pixels, resize_edge)


def _ico_frame_size(stream, offset: int) -> tuple[int, int]:
    """The size an ICO frame's own header declares (PNG, or BMP whose height counts the AND mask too)."""
    stream.seek(offset)
    is_png = stream.read(8) == PngImagePlugin._MAGIC
    stream.seek(offset)
    if is_png:
        return PngImagePlugin.PngImageFile(stream).size
    width, height = BmpImagePlugin.DibImageFile(stream).size
    return width, height // 2


def _decode_file(source, name: str, max_pixels: int, resize_edge: int | None) -> Image.Image:
    """Decode a path or bytes: the size is checked from the header before any pixel is decoded, and every
    decoder failure (Pillow raises OSError, SyntaxError, but also IndexError, ValueError, NotImplementedError...
    on malformed files) becomes a ValueError naming the file. Only MemoryError passes through."""
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise ValueError(f"Image file {name} does not exist.")
        if os.path.getsize(source) == 0:
            raise ValueError(f"Image file {name} is empty.")
    elif len(source) == 0:
        raise ValueError("Image bytes are empty.")
    _check_ico_frames(source, name, max_pixels, resize_edge)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            opened = Image.open(source if isinstance(source, (str, os.PathLike)) else io.BytesIO(source))  # header
    except UnidentifiedImageError:
        raise ValueError(f"{name} is not an image file Pillow can read.") from None
    except Image.DecompressionBombError as error:
        raise ValueError(f"Image {name} is too large: {error}") from None
    except MemoryError:
        raise
    except Exception as error:
        raise ValueError(f"Image {name} is truncated or corrupt ({type(error).__name__}: {error}).") from None
    with opened:  # closes the file; the decoded pixels stay (multi-frame files: frame 0)
        _check_size(opened.width, opened.height, name, max_pixels, resize_edge)
        try:
            opened.load()
        except MemoryError:
            raise
        except Exception as error:
            raise ValueError(f"Image {name} is truncated or corrupt ({type(error).__name__}: {error}).") from None
    return opened


def load_image(source, max_pixels: int = MAX_IMAGE_PIXELS, resize_edge: int | None = None) -> Image.Image:
    """Decode one image into an upright RGB PIL image.

    Args:
        source: a file path, raw bytes, a PIL image, or a numpy array of shape (H, W), (H, W, 3) or
            (H, W, 4) (uint8, or floats in [0, 1]).
        max_pixels: refuse images with more pixels than this (default `MAX_IMAGE_PIXELS`, 64 Mpx); files are
            checked from their header, before decoding.
        resize_edge: the short edge (pixels) an image processor will resize the image to, or None: images that
            resizing would take above `max_pixels` (very elongated ones) are refused too, also from the header.

    Raises:
        ValueError: naming the input when it is missing, empty, truncated, corrupt (whatever Pillow's decoder
            raises, MemoryError aside), not an image, or larger than `max_pixels`.

    Example:
        >>> load_image(np.zeros((8, 8, 3), dtype=np.uint8)).size
        (8, 8)
    """
    name = _describe(source)
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _from_array(source, name, max_pixels, resize_edge)
    elif isinstance(source, (str, os.PathLike, bytes, bytearray)):
        image = _decode_file(source, name, max_pixels, resize_edge)
    else:
        raise ValueError(f"Cannot read an image from {name}: pass a path, bytes, a PIL image or a numpy array.")
    _check_size(image.width, image.height, name, max_pixels, resize_edge)
    try:
        if image.mode == "RGB" and image.getexif().get(ORIENTATION_TAG, 1) == 1:
            return image  # already upright RGB (e.g. decoded earlier in the pipeline): no copies
        return _to_rgb(ImageOps.exif_transpose(image))
    except MemoryError:
        raise
    except Exception as error:  # a lazily opened PIL image decodes here; corrupt EXIF data raises too
        raise ValueError(f"Image {name} is corrupt ({type(error).__name__}: {error}).") from None


class GeoImageProcessor(CLIPImageProcessorPil):
    """CLIP's PIL image processor, accepting paths, bytes, numpy arrays and PIL images of any mode (decoded by
    `load_image`). Each model subclasses it under its own name, which its checkpoints record.

    Args:
        max_image_pixels (`int`, defaults to `MAX_IMAGE_PIXELS`, 64 Mpx): larger images are refused with a
            `ValueError` (files from their header, before decoding); saved in `preprocessor_config.json`.
        **kwargs: `CLIPImageProcessorPil`'s options (size, crop_size, mean, std...).

    Example:
        >>> processor = GeoImageProcessor()
        >>> processor(np.zeros((300, 400, 3), dtype=np.uint8), return_tensors="pt").pixel_values.shape
        torch.Size([1, 3, 224, 224])
    """

    def __init__(self, max_image_pixels: int = MAX_IMAGE_PIXELS, **kwargs):
        super().__init__(**kwargs)
        if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be a positive integer, got {max_image_pixels!r}.")
        self.max_image_pixels = max_image_pixels
        self._check_sizes()

    def _check_sizes(self) -> None:
        """Refuse a config whose resize or crop sizes are not positive integers, or whose square output alone
        exceeds `max_image_pixels` (e.g. `shortest_edge: 100000`: 1e10 pixels for any image)."""
        for setting, sizes in (("size", self.size), ("crop_size", self.crop_size)):
            edges = {key: value for key, value in dict(sizes or {}).items() if key not in ("min_pixels", "max_pixels")}
            for key, value in edges.items():
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"Image processor {setting}[{key!r}] must be a positive integer, got {value!r}.")
                largest = value * value if key.endswith("edge") or key.startswith("max_") else None
                area = largest or edges.get("height", 1) * edges.get("width", 1)
                if area > self.max_image_pixels:
                    raise ValueError(
                        f"Image processor {setting} {dict(edges)} makes images of {area} pixels, above its "
                        f"max_image_pixels ({self.max_image_pixels}): give edges up to "
                        f"{int(self.max_image_pixels ** 0.5)} pixels."
                    )

    @property
    def resize_edge(self) -> int | None:
        """The short edge that resizing gives every image (its long edge follows the aspect ratio), or None
        when the output size does not grow with the aspect ratio (fixed height/width, or a longest edge)."""
        size = self.size or {}
        if not self.do_resize or size.get("longest_edge") or not size.get("shortest_edge"):
            return None
        return size["shortest_edge"]

    def load(self, source) -> Image.Image:
        """`load_image` with this processor's limits: the pixel budget bounds the decoded image and its resize."""
        return load_image(source, self.max_image_pixels, self.resize_edge)

    def _resized(self, image: Image.Image, resample) -> Image.Image:
        """Resize as CLIP's processor would (same output size and filter, so the same pixels), but on the PIL
        image: CLIP's PIL backend first copies the full-size image to numpy and back (+400 MB at 64 Mpx)."""
        size = self.size
        if size.get("shortest_edge") and not size.get("longest_edge"):
            short, long = sorted((image.width, image.height))
            new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
            target = (new_short, new_long) if image.width <= image.height else (new_long, new_short)
        elif size.get("height") and size.get("width"):
            target = (size["width"], size["height"])
        else:
            return image
        return image.resize(target, resample=resample)

    def preprocess(self, images, *args, **kwargs):
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("No images given: the batch is empty.")
        if kwargs.get("size") is not None:
            raise ValueError("Pass size= when creating the image processor, where it is checked, not per call.")
        # An image decoded by `load` (an upright RGB PIL image) is checked again, never decoded again.
        images = [self.load(image) for image in images]
        if kwargs.pop("do_resize", None) is not False and self.do_resize:
            resample = kwargs.pop("resample", None)
            images = [self._resized(image, self.resample if resample is None else resample) for image in images]
        return super().preprocess(images, *args, do_resize=False, **kwargs)

__all__ = ["GeoImageProcessor", "MAX_IMAGE_PIXELS", "load_image"]
