"""Training-time image augmentations on PIL images, without torchvision.

Each recipe names one of `AUGMENTATIONS`; `build_augmentation(name, size)` returns a callable `(image, rng) -> image`
on PIL RGB images, applied by `geoloc.data.dataset.GeoCollator` before the image processor. Like torchvision's training
transforms, each augmentation ends with an image of exactly the tower's input `size` (its random crop resized
straight to it, whatever the photo's aspect ratio), and the processor then only normalises it: its resize and
centre crop are the evaluation transform. The collator draws `rng` from the run's seed, the epoch and the image
itself, so an image gets the same augmentation in a resumed run as in an uninterrupted one, with or without
DataLoader workers.

- `"none"`: the image as is.
- `"photo"`: the official GeoCLIP trainer's photo augmentation (`VicenteVivan/geo-clip`,
  `geoclip/train/dataloader.py`): random resized crop (scale 0.08-1, ratio 3/4-4/3) to the tower's size
  (`RandomResizedCrop(224)`: the whole crop, squeezed to a square where its ratio is not 1), horizontal flip (p 0.5),
  colour jitter with p 0.8 (brightness, contrast, saturation 0.4, hue 0.1), grayscale (p 0.2).
- `"geodecoder"`: the GeoDecoder co-author's photo augmentation (`AHKerrigan/GeoGuessNet`, `dataloader.py`
  m16_transform): a rotation by 1-15 degrees (RandomAffine((1, 15))), colour jitter (0.4, 0.4, 0.4, 0.1),
  horizontal flip (p 0.5), then a random square crop of 224/256 of the shorter side resized to the tower's size
  (Resize(256) + RandomCrop(224)).
- `"map"`: for the world-map crops of `geoloc.data.worldmap`: a mild random resized crop (scale 0.8-1, ratio
  0.9-1.1) and brightness / contrast jitter (0.2); no flip, no hue change and no grayscale, since a mirrored or
  recoloured map crop shows a different place.

With `--cache-features` images are embedded once, before training, so image augmentations do not apply there
(GeoCLIP's GPS noise still does); `geoloc train` says so when both are asked for.
"""

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

AUGMENTATIONS = ("none", "photo", "geodecoder", "map")


@dataclass
class Augmentation:
    """A random augmentation of PIL RGB images; `__call__(image) -> image`.

    Args:
        crop_scale (`tuple[float, float]`): area fraction range of the random resized crop (`(1, 1)`: no crop).
        crop_ratio (`tuple[float, float]`): aspect ratio range of that crop.
        rotation (`tuple[float, float]`): rotation range in degrees (`(0, 0)`: none).
        square_crop (`float`): side of a random square crop as a fraction of the shorter side (1: none).
        flip (`float`): probability of a horizontal flip.
        jitter (`float`): probability of colour jitter.
        brightness, contrast, saturation (`float`): jitter strength: a factor drawn from [1 - s, 1 + s].
        hue (`float`): hue shift drawn from [-hue, hue] (fraction of the colour wheel).
        grayscale (`float`): probability of converting to grayscale (kept as 3 channels).
        size (`tuple[int, int]`, *optional*): the output's (height, width), the tower's input size: the crops are
            resized straight to it. None: crops are resized back to the image's size (for tests of the draws).
    """

    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    rotation: tuple[float, float] = (0.0, 0.0)
    square_crop: float = 1.0
    flip: float = 0.0
    jitter: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale: float = 0.0
    size: tuple[int, int] | None = None

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Augment one PIL RGB image with the random draws of `rng`."""
        if self.rotation != (0.0, 0.0):
            image = image.rotate(rng.uniform(*self.rotation), Image.Resampling.BILINEAR)
        if rng.random() < self.jitter:
            image = self._colour_jitter(image, rng)
        if rng.random() < self.flip:
            image = ImageOps.mirror(image)
        if self.crop_scale != (1.0, 1.0):
            image = self._random_resized_crop(image, rng)
        if self.square_crop < 1.0:
            image = self._random_square_crop(image, rng)
        if rng.random() < self.grayscale:
            image = ImageOps.grayscale(image).convert("RGB")
        if self.size is not None and image.size != self.size[::-1]:
            image = image.resize(self.size[::-1], Image.Resampling.BILINEAR)
        return image

    def _output_size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) a crop is resized to: the tower's input size, else the image's own."""
        return image.size if self.size is None else self.size[::-1]

    def _random_resized_crop(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """torchvision's RandomResizedCrop: a box of random area and aspect ratio, resized to the output size
        (10 tries, then the whole image)."""
        width, height = image.size
        area = width * height
        log_ratio = np.log(self.crop_ratio)
        for _ in range(10):
            target = area * rng.uniform(*self.crop_scale)
            ratio = math.exp(rng.uniform(*log_ratio))
            box_width, box_height = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < box_width <= width and 0 < box_height <= height:
                left = int(rng.integers(0, width - box_width + 1))
                top = int(rng.integers(0, height - box_height + 1))
                box = (left, top, left + box_width, top + box_height)
                return image.resize(self._output_size(image), Image.Resampling.BILINEAR, box=box)
        return image.resize(self._output_size(image), Image.Resampling.BILINEAR)

    def _random_square_crop(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """A square of `square_crop` times the shorter side at a random position, resized to the output size
        (without one: left at its size)."""
        width, height = image.size
        side = max(1, round(self.square_crop * min(width, height)))
        left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        box = (left, top, left + side, top + side)
        if self.size is None:
            return image.crop(box)
        return image.resize(self.size[::-1], Image.Resampling.BILINEAR, box=box)

    def _colour_jitter(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Brightness, contrast, saturation and hue changes in a random order, as torchvision's ColorJitter."""
        changes = []
        for strength, enhancer in ((self.brightness, ImageEnhance.Brightness), (self.contrast, ImageEnhance.Contrast),
                                   (self.saturation, ImageEnhance.Color)):
            if strength:
                factor = rng.uniform(max(0.0, 1 - strength), 1 + strength)
                changes.append(lambda im, e=enhancer, f=factor: e(im).enhance(f))
        if self.hue:
            shift = rng.uniform(-self.hue, self.hue)
            changes.append(lambda im: _shift_hue(im, shift))
        for position in rng.permutation(len(changes)):
            image = changes[position](image)
        return image


def _shift_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue of an RGB image by `shift` (a fraction of the colour wheel, in [-0.5, 0.5])."""
    hue, saturation, value = image.convert("HSV").split()
    offset = int(round(shift * 255)) % 256
    hue = hue.point(lambda h: (h + offset) % 256)
    return Image.merge("HSV", (hue, saturation, value)).convert("RGB")


def build_augmentation(name: str, size: tuple[int, int] | None = None) -> Augmentation | None:
    """The augmentation called `name` (one of `AUGMENTATIONS`) with output `size` (height, width), or None for
    `"none"`.

    Example:
        >>> augment = build_augmentation("photo", size=(24, 24))
        >>> augment(Image.new("RGB", (64, 48), (120, 90, 60)), np.random.default_rng(0)).size
        (24, 24)
    """
    if name == "none":
        return None
    if name == "photo":
        return Augmentation(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=0.5, jitter=0.8, brightness=0.4,
                            contrast=0.4, saturation=0.4, hue=0.1, grayscale=0.2, size=size)
    if name == "geodecoder":
        return Augmentation(rotation=(1.0, 15.0), square_crop=224 / 256, flip=0.5, jitter=1.0, brightness=0.4,
                            contrast=0.4, saturation=0.4, hue=0.1, size=size)
    if name == "map":
        return Augmentation(crop_scale=(0.8, 1.0), crop_ratio=(0.9, 1.1), jitter=1.0, brightness=0.2, contrast=0.2,
                            size=size)
    raise ValueError(f"Unknown augmentation {name!r}; choose one of {AUGMENTATIONS}.")


__all__ = ["AUGMENTATIONS", "Augmentation", "build_augmentation"]
