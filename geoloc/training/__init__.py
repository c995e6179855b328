"""Training: one Accelerate loop (`train`, the `geoloc train` command) and one task per model (`tasks`), the
recipes (`recipes`: the published training settings) and the image augmentations (`augment`)."""
