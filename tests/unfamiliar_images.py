"""Small generated image sets that a world-map model has never seen (blank, 1x1, noise, photo-like)."""

import numpy as np
from PIL import Image


def _colour(rng) -> tuple:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def blank_images(rng, n: int) -> list:
    """Uniform images of a random colour and size."""
    return [Image.new("RGB", (int(rng.integers(16, 200)), int(rng.integers(16, 200))), _colour(rng)) for _ in range(n)]


def one_pixel_images(rng, n: int) -> list:
    return [Image.new("RGB", (1, 1), _colour(rng)) for _ in range(n)]


def noise_images(rng, n: int) -> list:
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


def photo_like_images(rng, n: int) -> list:
    """Landscape-like pictures: a sky gradient over textured ground with a horizon, plus a few solid objects."""
    images = []
    for _ in range(n):
        height, width, horizon = 96, 128, int(rng.integers(30, 70))
        sky = np.array([rng.uniform(90, 160), rng.uniform(140, 200), rng.uniform(200, 255)])
        ground = np.array([rng.uniform(40, 140), rng.uniform(60, 150), rng.uniform(20, 90)])
        rows = np.arange(height)[:, None]
        shade = np.where(rows < horizon, 1 - 0.3 * rows / horizon, 0.8 + 0.4 * (rows - horizon) / (height - horizon))
        base = np.where(rows[..., None] < horizon, sky, ground) * shade[..., None]
        pixels = np.broadcast_to(base, (height, width, 3)) + rng.normal(0, 12, (height, width, 3))
        for _ in range(int(rng.integers(2, 6))):
            x, y = int(rng.integers(0, width - 20)), int(rng.integers(horizon - 20, height - 10))
            pixels[y : y + int(rng.integers(8, 30)), x : x + int(rng.integers(5, 25))] = rng.uniform(0, 255, 3)
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images
