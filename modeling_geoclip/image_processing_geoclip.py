"""GeoCLIP's image processor.

Decoding (`load_image`) and CLIP-style preprocessing live in `geo_image_processing`, shared with GeoHier;
`GeoCLIPImageProcessor` is that processor under GeoCLIP's name, which GeoCLIP checkpoints record.
"""

from .geo_image_processing import MAX_IMAGE_PIXELS, GeoImageProcessor, load_image


class GeoCLIPImageProcessor(GeoImageProcessor):
    """CLIP's PIL image processor, accepting paths, bytes, numpy arrays and PIL images of any mode.

    Example:
        >>> import numpy as np
        >>> processor = GeoCLIPImageProcessor()
        >>> processor(np.zeros((300, 400, 3), dtype=np.uint8), return_tensors="pt").pixel_values.shape
        torch.Size([1, 3, 224, 224])
    """


__all__ = ["GeoCLIPImageProcessor", "MAX_IMAGE_PIXELS", "load_image"]
