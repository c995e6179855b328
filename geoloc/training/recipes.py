"""Training recipes: named sets of defaults for `geoloc train --recipe NAME`.

A recipe fills every training option the user does not give on the command line (an explicit option always
wins), so `geoloc train --recipe geoclip-paper --dataset DIR --output-dir OUT` trains with the published setup
and `--learning-rate 1e-4` changes only that. `geoloc train --model geoclip` alone uses `geoclip-tiny`.

Sources (each number's origin is given beside it; "unconfirmed" marks numbers we could not check in the paper's
text available to us):
- GeoCLIP: Vivanco Cepeda et al., NeurIPS 2023, and the official code `VicenteVivan/geo-clip` (geoclip 1.3.0:
  `GeoCLIP.__init__` queue_size=4096 and logit scale log(1/0.07); `train/dataloader.py` augmentations;
  `train/train.py` the loop: one optimizer step per batch, scheduler stepped per epoch).
- GeoDecoder: the co-author's code `AHKerrigan/GeoGuessNet` (commit b249832), its `main.py` training path only:
  `config.py` (getopt), `main.py` (criterion, optimiser, scheduler), `train_and_eval.py` (`train_images`: the
  loss and the accumulation), `dataloader.py` (`m16_transform`, `m16_val_transform`, MP-16 labels), `networks.py`
  (GeoGuess1). Not `lit.py` (a Lightning variant with AdamW and 0.5/0.3/0.2 level weights) and not the paper
  (Clark et al., CVPR 2023), whose training numbers we could not read: the two are not mixed.
"""

from dataclasses import asdict, dataclass, field, fields

from .augment import AUGMENTATIONS

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "step")


@dataclass(frozen=True)
class Recipe:
    """The training defaults of one recipe; field names are `geoloc train` option names (dashes as underscores).

    `max_steps` or `epochs` sets the length (epochs are turned into steps once the dataset size is known);
    `batch_size` is the global batch per optimizer step, over all processes and accumulation steps.
    `model_options` sets options of the model's own training task (its `recipe_options`, e.g. GeoCLIP's
    `gps_noise_km`); the task's defaults fill the rest.
    """

    name: str
    model: str
    description: str
    model_config: str = "tiny"
    backbone: str | None = None
    train_backbone: bool = False
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 64
    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 1e-6
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int = 0
    decay_every_epochs: float = 1.0
    decay_gamma: float = 1.0
    max_grad_norm: float = 1.0
    augmentation: str = "none"
    model_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS or self.schedule not in SCHEDULES or self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"Recipe {self.name!r}: bad optimizer, schedule or augmentation.")
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError(f"Recipe {self.name!r} must set exactly one of max_steps and epochs.")

    def defaults(self) -> dict:
        """The shared option defaults of this recipe (not its name, model, description or model options)."""
        return {key: value for key, value in asdict(self).items() if key in RECIPE_OPTIONS}


RECIPES = {recipe.name: recipe for recipe in (
    Recipe(
        name="geoclip-tiny",
        model="geoclip",
        description="Tiny random GeoCLIP for CPU runs and tests (world-map crops): unlike the paper it trains its "
                    "tiny CLIP tower too, since a frozen random tower carries no information.",
        # Tuned on 2,000 world-map crops (benchmarks/bench_learnability.py): map augmentation and 100 km of GPS
        # noise each roughly halved the median error of 2,500 un-regularised steps (1,913 km -> 878 / 500 km).
        # (Then the queue held the batch's noised locations; it now gets its own draw of the same noise.)
        train_backbone=True,
        max_steps=2000,
        batch_size=128,
        learning_rate=1e-3,
        weight_decay=1e-6,
        warmup_steps=50,
        augmentation="map",
        model_options=dict(gps_noise_km=100.0, queue_noise_km=100.0, queue_size=1024),
    ),
    Recipe(
        name="geohier-tiny",
        model="geohier",
        description="Tiny random GeoHier for CPU runs and tests (world-map crops), trained end to end.",
        train_backbone=True,
        max_steps=2000,
        batch_size=64,
        learning_rate=2e-3,
        weight_decay=1e-6,
        warmup_steps=50,
        augmentation="map",
    ),
    Recipe(
        name="geoclip-paper",
        model="geoclip",
        description="GeoCLIP as published: frozen CLIP ViT-L/14 towers, trainable image MLP, location encoder and "
                    "temperature; contrastive loss against the batch and a 4096-point GPS queue.",
        backbone="openai/clip-vit-large-patch14",  # paper Sec. 3.1; official code image_encoder.py
        train_backbone=False,                      # paper Sec. 3.1: the CLIP backbone is frozen
        epochs=10,                                 # unconfirmed (third-party configs of the paper)
        batch_size=512,                            # paper Sec. 4 (implementation details)
        optimizer="adam",                          # unconfirmed (third-party configs): Adam
        learning_rate=3e-5,                        # unconfirmed (third-party configs)
        weight_decay=1e-6,                         # unconfirmed (third-party configs)
        schedule="step",                           # official train.py: scheduler.step() once per epoch
        decay_every_epochs=1.0,
        decay_gamma=0.87,                          # unconfirmed (third-party configs): StepLR gamma 0.87
        max_grad_norm=0.0,                         # official train.py: no clipping
        augmentation="photo",                      # official train/dataloader.py img_train_transform
        model_options=dict(
            gps_noise_km=0.15,                     # paper: SD 150 m on the batch's coordinates and 1 km on the
            queue_noise_km=1.0,                    # queue's (quoted in geo-clip issue #17); the official code adds none
            queue_size=4096,                       # official GeoCLIP(queue_size=4096); paper Sec. 3.3
        ),
    ),
    Recipe(
        name="geodecoder-paper",
        model="geohier",
        description="GeoDecoder as trained by the co-author's GeoGuessNet main.py: ViT-B/16 (ImageNet-21k) fine-tuned "
                    "end to end under a 16-scene x 3-level query decoder on the published MP-16 partitions (--geocells "
                    "from `geoloc geocells import`) with MP-16's scene labels; SGD 0.1 with step decay; the three "
                    "level losses and the scene loss label-smoothed (0.1) and summed with equal weights.",
        # GGN = AHKerrigan/GeoGuessNet at b249832; every value below was read there.
        backbone="google/vit-base-patch16-224-in21k",  # GGN networks.py GeoGuess1: ViTModel.from_pretrained(...)
        train_backbone=True,                           # GGN main.py: SGD(model.parameters(), ...), backbone included
        epochs=40,                                     # GGN config.py: opt.n_epochs = 40
        batch_size=256,                                # GGN config.py: batch_size 128 x accumulate 2, gpus 1
        optimizer="sgd",                               # GGN main.py: torch.optim.SGD(..., momentum=0.9, ...)
        learning_rate=0.1,                             # GGN config.py: opt.lr = 0.1
        weight_decay=1e-4,                             # GGN main.py: SGD(..., weight_decay=0.0001)
        momentum=0.9,                                  # GGN main.py: SGD(..., momentum=0.9, ...)
        schedule="step",                               # GGN main.py: StepLR, scheduler.step() once per epoch
        warmup_steps=0,                                # GGN main.py: no warm-up
        decay_every_epochs=4.0,                        # GGN config.py: opt.step_size = 4 (StepLR step_size)
        decay_gamma=0.5,                               # GGN main.py: StepLR(..., gamma=0.5)
        max_grad_norm=0.0,                             # GGN train_and_eval.py: no clipping
        augmentation="geodecoder",                     # GGN dataloader.py m16_transform (and m16_val_transform)
        model_options=dict(
            label_smoothing=0.1,                       # GGN main.py: CrossEntropyLoss(label_smoothing=0.1), every level
            scene_label_smoothing=0.1,                 # GGN train_and_eval.py: sceneloss = criterion(...), the same one
            level_loss_weights="1,1,1",                # GGN train_and_eval.py: loss = loss1 + loss2 + loss3
            # GGN train_and_eval.py: `#loss /= opt.accumulate` is commented out, so the gradients of its 2
            # micro-batches of 128 add up: twice the gradient of the mean loss over the step's 256 images.
            loss_scale=2.0,
            scenes=True,                               # GGN dataloader.py: scene labels S16_Label (scenes[:, 1])
            # GGN networks.py: 3298 / 7202 / 12893 classes; train_and_eval.py answers with cells_50_1000.csv's means.
            geocell_levels="geoestimation",
        ),
    ),
)}

RECIPE_OPTIONS = tuple(f.name for f in fields(Recipe) if f.name not in ("name", "model", "description", "model_options"))


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`, or a ValueError listing the known ones."""
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; choose one of {sorted(RECIPES)}.")
    return RECIPES[name]


__all__ = ["OPTIMIZERS", "RECIPES", "RECIPE_OPTIONS", "SCHEDULES", "Recipe", "get_recipe"]
