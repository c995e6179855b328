"""Training: one Accelerate loop (`train`, the `geoloc train` command) and one task per model (`tasks`), GeoCLIP's
contrastive loss with its queue and gather (`geoclip_loss`), the recipes (`recipes`: the published training
settings) and the image augmentations (`augment`)."""
