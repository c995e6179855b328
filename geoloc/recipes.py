"""Training recipes: named sets of defaults for `geoloc train --recipe NAME`.

A recipe fills every training option the user does not give on the command line (an explicit option always
wins), so `geoloc train --recipe geoclip-paper --dataset DIR --output-dir OUT` trains with the published setup
and `--learning-rate 1e-4` changes only that. `geoloc train --model geoclip` alone uses `geoclip-tiny`.

Sources (each number's origin is given beside it; "unconfirmed" marks numbers we could not check in the paper's
text available to us):
- GeoCLIP: Vivanco Cepeda et al., NeurIPS 2023, and the official code `VicenteVivan/geo-clip` (geoclip 1.3.0:
  `GeoCLIP.__init__` queue_size=4096 and logit scale log(1/0.07); `train/dataloader.py` augmentations;
  `train/train.py` the loop: one optimizer step per batch, scheduler stepped per epoch).
- GeoDecoder: Clark et al., CVPR 2023, and the co-author's earlier code `AHKerrigan/GeoGuessNet` (`config.py`,
  `main.py`, `networks.py` GeoGuess1, `dataloader.py`, `lit.py`), which is the same query decoder (16 scenes x 3
  levels over ViT-B/16 in21k tokens).
"""

from dataclasses import asdict, dataclass, fields

from .augment import AUGMENTATIONS

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "step")


@dataclass(frozen=True)
class Recipe:
    """The training defaults of one recipe; field names are `geoloc train` option names (dashes as underscores).

    `max_steps` or `epochs` sets the length (epochs are turned into steps once the dataset size is known);
    `batch_size` is the global batch per optimizer step, over all processes and accumulation steps.
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
    gps_noise_km: float = 0.0
    queue_noise_km: float = 0.0
    queue_size: int | None = None
    label_smoothing: float | None = None
    geocell_levels: str = "auto"

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS or self.schedule not in SCHEDULES or self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"Recipe {self.name!r}: bad optimizer, schedule or augmentation.")
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError(f"Recipe {self.name!r} must set exactly one of max_steps and epochs.")

    def defaults(self) -> dict:
        """The option defaults of this recipe, without its name, model and description."""
        return {key: value for key, value in asdict(self).items() if key not in ("name", "model", "description")}


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
        gps_noise_km=100.0,
        queue_noise_km=100.0,
        queue_size=1024,
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
        gps_noise_km=0.15,                         # paper: SD 150 m on the batch's coordinates and 1 km on the
        queue_noise_km=1.0,                        # queue's (quoted in geo-clip issue #17); the official code adds none
        queue_size=4096,                           # official GeoCLIP(queue_size=4096); paper Sec. 3.3
    ),
    Recipe(
        name="geodecoder-paper",
        model="geohier",
        description="GeoDecoder as in the co-author's code: ViT-B/16 (ImageNet-21k) fine-tuned end to end under a "
                    "16-scene x 3-level query decoder, SGD with step decay, label smoothing 0.1.",
        backbone="google/vit-base-patch16-224-in21k",  # GeoGuessNet networks.py GeoGuess1
        train_backbone=True,                           # GeoGuessNet main.py: all parameters in the optimizer
        epochs=40,                                     # GeoGuessNet config.py n_epochs
        batch_size=256,                                # GeoGuessNet config.py batch_size 128 x accumulate 2
        optimizer="sgd",                               # GeoGuessNet main.py SGD(momentum=0.9)
        learning_rate=0.1,                             # GeoGuessNet config.py lr
        weight_decay=1e-4,                             # GeoGuessNet main.py
        momentum=0.9,
        schedule="step",                               # GeoGuessNet main.py StepLR(step_size=4, gamma=0.5)
        decay_every_epochs=4.0,
        decay_gamma=0.5,
        max_grad_norm=0.0,                             # GeoGuessNet: no clipping
        augmentation="geodecoder",                     # GeoGuessNet dataloader.py m16_transform
        label_smoothing=0.1,                           # GeoGuessNet main.py CrossEntropyLoss(label_smoothing=0.1)
        geocell_levels="50:5000,50:2000,50:1000",      # Mueller-Budack et al. partitions (GeoGuessNet classes)
    ),
)}

DEFAULT_RECIPES = {"geoclip": "geoclip-tiny", "geohier": "geohier-tiny"}
RECIPE_OPTIONS = tuple(field.name for field in fields(Recipe) if field.name not in ("name", "model", "description"))


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`, or a ValueError listing the known ones."""
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; choose one of {sorted(RECIPES)}.")
    return RECIPES[name]


__all__ = ["DEFAULT_RECIPES", "OPTIMIZERS", "RECIPES", "RECIPE_OPTIONS", "SCHEDULES", "Recipe", "get_recipe"]
