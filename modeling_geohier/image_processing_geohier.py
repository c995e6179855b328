"""GeoHier's image processor: the package's shared decoding and CLIP-style preprocessing (`geo_image_processing`)
under GeoHier's name, which GeoHier checkpoints record in `preprocessor_config.json`, plus GeoGuessNet's ten-crop
evaluation."""

from PIL import Image, ImageOps

from .geo_image_processing import GeoImageProcessor, load_image

TEN_CROPS = 10


class GeoHierImageProcessor(GeoImageProcessor):
    """Decodes paths, bytes, numpy arrays and PIL images of any mode (`load_image`), then resizes, crops and
    normalises as CLIP does; set `size`, `crop_size`, `image_mean` and `image_std` to match the backbone.

    Example:
        >>> import numpy as np
        >>> processor = GeoHierImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        >>> processor(np.zeros((40, 60, 3), dtype=np.uint8), return_tensors="pt").pixel_values.shape
        torch.Size([1, 3, 32, 32])
    """

    def ten_crop(self, images, return_tensors="pt"):
        """torchvision's `TenCrop` after this processor's resize (GeoGuessNet's `m16_val_transform` with
        `opt.tencrop`): the four corner crops and the centre crop of `crop_size`, then the same five of the mirrored
        image; `GeoHierModel.geolocate(..., num_crops=10)` averages over them.

        Returns: `BatchFeature` with `pixel_values` `(10 * B, 3, crop height, crop width)`, an image's ten crops
        consecutive.

        Raises:
            ValueError: when the processor resizes without cropping (a fixed resize leaves nothing to crop), or for
                an unreadable image.
        """
        if not self.do_center_crop or "shortest_edge" not in (self.size or {}):
            raise ValueError(f"Ten-crop needs a processor that resizes the shorter side and then crops (e.g. "
                             f"shortest_edge 256, crop 224); this one has size {self.size}, do_center_crop "
                             f"{self.do_center_crop}.")
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("No images given: the batch is empty.")
        crops = []
        for image in images:
            image = self._resize_shorter_side(load_image(image, self.max_image_pixels))
            crops += self._five_crops(image) + self._five_crops(ImageOps.mirror(image))
        return self.preprocess(crops, do_resize=False, do_center_crop=False, return_tensors=return_tensors)

    def _resize_shorter_side(self, image: Image.Image) -> Image.Image:
        """torchvision's `Resize(shortest_edge)`: the shorter side to `shortest_edge`, the longer in proportion."""
        edge, (width, height) = self.size["shortest_edge"], image.size
        if width <= height:
            size = (edge, int(edge * height / width))
        else:
            size = (int(edge * width / height), edge)
        return image.resize(size, Image.Resampling(int(self.resample)))

    def _five_crops(self, image: Image.Image) -> list[Image.Image]:
        """torchvision's `five_crop`: top-left, top-right, bottom-left, bottom-right, centre."""
        width, height = image.size
        crop_height, crop_width = self.crop_size["height"], self.crop_size["width"]
        if crop_width > width or crop_height > height:
            raise ValueError(f"Crop {crop_width}x{crop_height} is larger than the resized image {width}x{height}.")
        top, left = int(round((height - crop_height) / 2)), int(round((width - crop_width) / 2))
        corners = [(0, 0), (width - crop_width, 0), (0, height - crop_height),
                   (width - crop_width, height - crop_height), (left, top)]
        return [image.crop((x, y, x + crop_width, y + crop_height)) for x, y in corners]


__all__ = ["GeoHierImageProcessor", "TEN_CROPS"]
