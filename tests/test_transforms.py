"""Training and evaluation image transforms as the sources define them: a random crop reaches the tower whole and
at its input size (torchvision's RandomResizedCrop(224), official GeoCLIP), GeoDecoder evaluates on resize-256 +
centre crop 224 or ten crops (GeoGuessNet's m16_val_transform)."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from geoloc.training.augment import build_augmentation
from geoloc.configs import tiny_image_processor
from geoloc.data.dataset import GeoCollator
from geoloc.training.tasks import IMAGENET_MEAN, IMAGENET_STD, geodecoder_image_processor

WIDTH, HEIGHT = 400, 300  # a 4:3 photo


def coordinate_image() -> Image.Image:
    """A 4:3 image whose red channel is the column and green channel the row (both scaled to 0..255)."""
    x = np.broadcast_to(np.linspace(0, 255, WIDTH), (HEIGHT, WIDTH))
    y = np.broadcast_to(np.linspace(0, 255, HEIGHT)[:, None], (HEIGHT, WIDTH))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1).round().astype(np.uint8))


def striped_image() -> Image.Image:
    """Grey 4:3 image with a red stripe on the left tenth, a blue one on the right tenth, green in the centre."""
    pixels = np.full((HEIGHT, WIDTH, 3), 128, dtype=np.uint8)
    pixels[:, : WIDTH // 10] = (255, 0, 0)
    pixels[:, -WIDTH // 10 :] = (0, 0, 255)
    pixels[HEIGHT // 2 - 20 : HEIGHT // 2 + 20, WIDTH // 2 - 20 : WIDTH // 2 + 20] = (0, 255, 0)
    return Image.fromarray(pixels)


def pixels(pixel_values: torch.Tensor, processor) -> np.ndarray:
    """Processor output (3, H, W) back to 0..255 (H, W, 3)."""
    mean, std = torch.tensor(processor.image_mean)[:, None, None], torch.tensor(processor.image_std)[:, None, None]
    return ((pixel_values * std + mean) * 255).permute(1, 2, 0).numpy()


def geometric_only(name: str, size):
    """The named augmentation without its colour changes and flips, so that pixels keep their coordinates."""
    return dataclasses.replace(build_augmentation(name, size), jitter=0.0, grayscale=0.0, flip=0.0)


def test_photo_crop_is_kept_whole_at_the_tower_size():
    processor = tiny_image_processor("geoclip")  # CLIP-style: resize shorter side 32 + centre crop 32
    collate = GeoCollator(processor, augment=geometric_only("photo", (32, 32)), seed=0)
    ratios = []
    for seed in range(12):
        collate.seed = seed
        batch = collate([{"image": coordinate_image(), "latitude": 0.0, "longitude": 0.0}])
        assert batch["pixel_values"].shape == (1, 3, 32, 32)
        seen = pixels(batch["pixel_values"][0], processor)
        # The crop box in image pixels, from the coordinates at the output's edges (half a pixel inside).
        left, right = seen[16, [0, -1], 0] / 255 * (WIDTH - 1)
        top, bottom = seen[[0, -1], 16, 1] / 255 * (HEIGHT - 1)
        box_width, box_height = (right - left) * 32 / 31, (bottom - top) * 32 / 31
        area = box_width * box_height / (WIDTH * HEIGHT)
        ratios.append(box_width / box_height)
        assert 0.08 * 0.8 <= area <= 1.05, (seed, area)
        assert 3 / 4 * 0.9 <= ratios[-1] <= 4 / 3 * 1.1, (seed, ratios[-1])
    # A centre crop of the box (the old resize-back + CLIP crop) would always show a square region.
    assert max(abs(ratio - 1) for ratio in ratios) > 0.1


def test_whole_image_crop_keeps_its_sides_in_training_but_eval_crops_the_centre():
    image = striped_image()
    processor = tiny_image_processor("geoclip")
    augment = dataclasses.replace(geometric_only("photo", (32, 32)), crop_scale=(0.999, 1.0))
    trained = pixels(GeoCollator(processor, augment=augment)([{"image": image, "latitude": 0.0, "longitude": 0.0}])[
        "pixel_values"][0], processor)
    assert trained[:, 0, 0].min() > 200 and trained[:, 0, 2].max() < 30  # red stripe at the left edge
    assert trained[:, -1, 2].min() > 200 and trained[:, -1, 0].max() < 30  # blue stripe at the right edge
    evaluated = pixels(processor(image, return_tensors="pt").pixel_values[0], processor)
    assert evaluated[:, [0, -1], :2].max() < 140  # CLIP's centre crop of a 4:3 photo drops both stripes


def test_geodecoder_augmentation_and_evaluation_transform():
    trained = geometric_only("geodecoder", (32, 32))(striped_image(), np.random.default_rng(0))
    assert trained.size == (32, 32)
    processor = geodecoder_image_processor((32, 32))
    assert processor.size == {"shortest_edge": 37} and processor.crop_size == {"height": 32, "width": 32}
    assert tuple(processor.image_mean) == IMAGENET_MEAN and tuple(processor.image_std) == IMAGENET_STD
    out = processor(coordinate_image(), return_tensors="pt").pixel_values
    assert out.shape == (1, 3, 32, 32)
    seen = pixels(out[0], processor)
    # Resize to 49 x 37 (shorter side 37 = 32 x 256 / 224), centre crop 32 x 32: columns 8..40 of 49.
    assert seen[16, 0, 0] / 255 * WIDTH == pytest.approx(8.5 / 49 * WIDTH, abs=6)
    assert seen[16, -1, 0] / 255 * WIDTH == pytest.approx(39.5 / 49 * WIDTH, abs=6)
    assert seen[0, 16, 1] / 255 * HEIGHT == pytest.approx(2.5 / 37 * HEIGHT, abs=6)


def test_ten_crop_is_torchvisions():
    processor = geodecoder_image_processor((32, 32))
    crops = processor.ten_crop([coordinate_image(), coordinate_image()], return_tensors="pt").pixel_values
    assert crops.shape == (20, 3, 32, 32)
    assert torch.equal(crops[:10], crops[10:])
    resized_width, resized_height = 49, 37
    corners = [(0, 0), (resized_width - 32, 0), (0, resized_height - 32), (resized_width - 32, resized_height - 32),
               (8, 2)]  # torchvision's centre: round((49 - 32) / 2) = 8, round((37 - 32) / 2) = 2
    for index, (left, top) in enumerate(corners):
        seen = pixels(crops[index], processor)
        assert seen[0, 0, 0] / 255 * resized_width == pytest.approx(left + 0.5, abs=1), index
        assert seen[0, 0, 1] / 255 * resized_height == pytest.approx(top + 0.5, abs=1), index
        mirrored = pixels(crops[5 + index], processor)  # the same crop of the mirror image: its left is our right
        assert mirrored[0, 0, 0] / 255 * resized_width == pytest.approx(resized_width - left - 0.5, abs=1), index
    with pytest.raises(ValueError, match="Ten-crop needs"):
        tiny_image_processor("geohier").__class__(do_center_crop=False).ten_crop([coordinate_image()])
