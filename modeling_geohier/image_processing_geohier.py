"""GeoHier's image processor: the package's shared decoding and CLIP-style preprocessing (`geo_image_processing`)
under GeoHier's name, which GeoHier checkpoints record in `preprocessor_config.json`."""

from .geo_image_processing import GeoImageProcessor


class GeoHierImageProcessor(GeoImageProcessor):
    """Decodes paths, bytes, numpy arrays and PIL images of any mode (`load_image`), then resizes, crops and
    normalises as CLIP does; set `size`, `crop_size`, `image_mean` and `image_std` to match the backbone.

    Example:
        >>> import numpy as np
        >>> processor = GeoHierImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        >>> processor(np.zeros((40, 60, 3), dtype=np.uint8), return_tensors="pt").pixel_values.shape
        torch.Size([1, 3, 32, 32])
    """


__all__ = ["GeoHierImageProcessor"]
