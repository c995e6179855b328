"""What `geoloc.training.train`'s one Accelerate loop needs from each model family: a small task object per model.

A task builds its model and processors (a tiny random model, a checkpoint to fine-tune, or a pretrained backbone
with fresh heads), turns the dataset into training batches, computes the loss of a batch, does what must follow
an optimizer step, and adds what the saved model needs (GeoCLIP's gallery, GeoHier's cell table). The loop in
`geoloc/training/train.py` knows nothing else about the models, so a third model joins by subclassing `TrainingTask` and
decorating it with `@register_task("name")`; `geoloc train --model name` then trains it. A task declares its
own options (`add_arguments`), their checks (`check_args`) and the defaults of those a recipe may set
(`recipe_options`); recipes (`geoloc.training.recipes`) name values for them in `model_options`.

    @register_task("mymodel")
    class MyTask(TrainingTask):
        recipe_options = {"my_weight": 1.0}
        def build(self, dataset, latitudes, longitudes): ...
        def loss(self, model, batch, weight=1.0): ...
"""

import argparse
import hashlib
import json
import math
import os
from typing import ClassVar

import datasets
import numpy as np
import torch
from transformers import AutoImageProcessor, AutoTokenizer
from transformers.image_utils import PILImageResampling

from modeling_geoclip import GeoCLIPImageProcessor, GeoCLIPModel
from modeling_geohier import GeoHierImageProcessor, GeoHierModel

from .augment import build_augmentation
from ..configs import byte_level_clip_tokenizer, tiny_geoclip_config, tiny_geohier_config, tiny_image_processor
from ..data.dataset import IMAGE, LATITUDE, LONGITUDE, GeoCollator, decode_images, image_limits
from ..data.gallery import training_gallery
from .geoclip_loss import GeoCLIPLoss

TRAINING_TASKS: dict[str, type["TrainingTask"]] = {}
SCENE_LABELS = "scene_labels"
# `--geocell-levels` of a recipe that trains on GeoEstimation's published partitions, given with --geocells.
GEOESTIMATION_PARTITIONS = "geoestimation"


def register_task(name: str):
    """Class decorator: make a `TrainingTask` subclass trainable as `geoloc train --model NAME`."""

    def register(task_class: type["TrainingTask"]) -> type["TrainingTask"]:
        task_class.name = name
        TRAINING_TASKS[name] = task_class
        return task_class

    return register


def backbone_image_processor(backbone: str, processor_class):
    """A `processor_class` (the model family's processor: robust decoding of any file) with the resizing and
    normalisation of the backbone's own image processor (e.g. CLIP's resize + centre crop, ViT's 224x224 resize,
    their mean/std)."""
    source = AutoImageProcessor.from_pretrained(backbone, trust_remote_code=False).to_dict()
    known = processor_class().to_dict()
    options = {key: value for key, value in source.items()
               if key in known and not key.startswith("_") and key not in ("image_processor_type", "processor_class")}
    if "do_center_crop" not in source:  # e.g. ViT: a plain resize to the model's size
        options["do_center_crop"] = False
    return processor_class(**options)


def processor_input_size(image_processor) -> tuple[int, int]:
    """(height, width) of the images an image processor makes: its centre crop, else its fixed resize."""
    size = image_processor.crop_size if image_processor.do_center_crop else image_processor.size
    if not size or "height" not in size:
        raise ValueError(f"The image processor makes no fixed-size images (size {image_processor.size}, "
                         f"do_center_crop {image_processor.do_center_crop}): give it a crop_size.")
    return int(size["height"]), int(size["width"])


class TrainingTask:
    """One model family's part of training; see the module docstring.

    Attributes set by `build`: `model`, `image_processor`, `tokenizer` (None when the model reads no text).
    `args` is the resolved `geoloc train` namespace, `accelerator` the run's `Accelerator`.
    """

    name: ClassVar[str] = ""
    # The options of `add_arguments` that recipes set (their argparse default is None), with their values when
    # the recipe does not; a recipe's `model_options` may name only these.
    recipe_options: ClassVar[dict] = {}
    # The recipe of `geoloc train --model NAME` without --recipe (None: the shared and task defaults only).
    default_recipe: ClassVar[str | None] = None

    def __init__(self, args, accelerator):
        self.args, self.accelerator = args, accelerator
        self.model = self.image_processor = self.tokenizer = None
        self.image_collator = None  # the GeoCollator of `training_data`, when batches are decoded images

    @classmethod
    def add_arguments(cls, parser) -> None:
        """Add this model's own options (an argument group) to the `geoloc train` parser."""

    @classmethod
    def check_args(cls, args) -> None:
        """Raise ValueError on option values this model cannot train with."""

    def build(self, dataset, latitudes: np.ndarray, longitudes: np.ndarray) -> None:
        """Create `self.model`, `self.image_processor` and `self.tokenizer` for the training coordinates."""
        raise NotImplementedError

    def training_data(self, dataset) -> tuple[object, object]:
        """`(dataset, collate_fn)` for the DataLoader: by default the rows decoded and augmented by `GeoCollator`."""
        return dataset, self.collator()

    def collator(self, label_columns=()) -> GeoCollator:
        """`GeoCollator` with this run's processor, augmentation and seed (kept for `set_epoch`)."""
        augment = None
        if self.args.augmentation != "none":  # augmentations end at the tower's input size
            augment = build_augmentation(self.args.augmentation, processor_input_size(self.image_processor))
        self.image_collator = GeoCollator(self.image_processor, label_columns, augment=augment, seed=self.args.seed)
        return self.image_collator

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch's batches are made: image augmentation draws depend on the epoch."""
        if self.image_collator is not None:
            self.image_collator.epoch = epoch

    def start_step(self, batches: list[dict], weights: list[float]) -> list[dict]:
        """Called with the micro-batches of one optimizer step (this process's, in order) before their losses;
        returns them, with anything their losses need added (e.g. GeoCLIP's rows in the global batch)."""
        return batches

    def loss(self, model, batch: dict, weight: float = 1.0) -> torch.Tensor:
        """The loss of one micro-batch (times `weight`; 0 for a stand-in batch, see `geoloc.training.train`)."""
        raise NotImplementedError

    def after_step(self, model) -> None:
        """Called once after each optimizer step (e.g. GeoCLIP's queue update)."""

    def finalize(self, model, latitudes: np.ndarray, longitudes: np.ndarray) -> None:
        """Add what the saved model needs besides its weights (main process, before `save`)."""

    def save(self, model, output_dir: str) -> None:
        """Write the model and its processors with `save_pretrained`."""
        model.save_pretrained(output_dir)
        self.image_processor.save_pretrained(output_dir)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(output_dir)


# ---------------------------------------------------------------------------------------------------- GeoCLIP
@register_task("geoclip")
class GeoCLIPTask(TrainingTask):
    """GeoCLIP's contrastive training, step for step as the official loop (`geoclip/train/train.py` of
    geoclip 1.3.0): each image is scored against the locations of the whole global batch (every process, every
    accumulated micro-batch) and the GPS queue as it was before the step; after the step the global batch enters
    the queue. So 1 process, N processes and gradient accumulation train the same weights from the same batches.

    GPS noise as in the paper: the batch's coordinates are moved by Gaussian noise of
    `--gps-noise-km` (150 m) and the locations entering the queue by `--queue-noise-km` (1 km), as distances on
    the sphere. The official code adds none (intended difference only where a recipe sets it). The loss, its
    gather and its queue updates are `geoloc.training.geoclip_loss.GeoCLIPLoss`."""

    recipe_options = {"queue_size": None, "gps_noise_km": 0.0, "queue_noise_km": 0.0}  # None: the config's
    default_recipe = "geoclip-tiny"

    @classmethod
    def add_arguments(cls, parser) -> None:
        group = parser.add_argument_group("GeoCLIP")
        group.add_argument("--queue-size", type=int, help="GPS queue of negatives (recipe default)")
        group.add_argument("--gps-noise-km", type=float,
                           help="GPS augmentation: move each training location of the batch by 2-D Gaussian noise "
                                "of this standard deviation per axis, km (recipe default)")
        group.add_argument("--queue-noise-km", type=float,
                           help="the same noise for the locations as they enter the GPS queue, km (recipe default)")
        group.add_argument("--cache-features", action="store_true",
                           help="precompute the frozen CLIP image embeddings once and train on them (needs a frozen "
                                "image tower; image augmentation does not apply, GPS noise does)")
        group.add_argument("--cache-dir", default=DEFAULT_FEATURE_CACHE, help="where cached features are kept")
        group.add_argument("--gallery-size", type=int, default=100_000,
                           help="cap on the gallery of training coordinates saved with the model")

    @classmethod
    def check_args(cls, args) -> None:
        if args.queue_size < 0 or args.gps_noise_km < 0 or args.queue_noise_km < 0 or args.gallery_size < 1:
            raise ValueError("--queue-size, --gps-noise-km and --queue-noise-km must be >= 0 and --gallery-size >= 1.")
        if args.cache_features and args.train_backbone:
            raise ValueError("--cache-features needs a frozen image tower: add --no-train-backbone.")

    def build(self, dataset, latitudes, longitudes) -> None:
        args = self.args
        if args.backbone:
            self.model = GeoCLIPModel.from_clip_backbone(args.backbone, queue_size=args.queue_size)
            self.image_processor = backbone_image_processor(args.backbone, GeoCLIPImageProcessor)
            self.tokenizer = AutoTokenizer.from_pretrained(args.backbone, trust_remote_code=False)
        elif args.model_config == "tiny":
            self.model = GeoCLIPModel(tiny_geoclip_config(queue_size=args.queue_size))
            self.image_processor, self.tokenizer = tiny_image_processor("geoclip"), byte_level_clip_tokenizer()
        else:
            self.model = GeoCLIPModel.from_pretrained(args.model_config)
            self.image_processor = AutoImageProcessor.from_pretrained(args.model_config, trust_remote_code=False)
            self.tokenizer = AutoTokenizer.from_pretrained(args.model_config, trust_remote_code=False)
            if "queue_size" in args.given_options and args.queue_size != self.model.config.queue_size:
                raise ValueError(f"--queue-size {args.queue_size}: {args.model_config} has a queue of "
                                 f"{self.model.config.queue_size} (its contents are part of the training state).")
        self.contrastive_loss = GeoCLIPLoss(self.accelerator, args.gps_noise_km, args.queue_noise_km)
        # The text tower is never trained (the paper aligns images and GPS; text reads the image MLP's space).
        self.model.config.freeze_backbone = not args.train_backbone
        self.model.image_tower.requires_grad_(args.train_backbone)
        # text means something only on pretrained CLIP towers whose image tower stays frozen (the text tower never trains)
        pretrained = bool(args.backbone) or (args.model_config != "tiny" and self.model.config.text_aligned)
        self.model.config.text_aligned = pretrained and not args.train_backbone
        if self.model.text_tower is not None:
            self.model.text_tower.requires_grad_(False)

    def training_data(self, dataset):
        if not self.args.cache_features:
            return dataset, self.collator()
        if self.args.augmentation != "none":
            self.accelerator.print(f"--cache-features: the image tower sees each image once, un-augmented "
                                   f"(--augmentation {self.args.augmentation} does not apply; GPS noise does).")
        features = cache_clip_features(self.model, self.image_processor, dataset, self.args.cache_dir, self.accelerator)
        return CachedFeatures(features), CachedFeatures.collate

    def start_step(self, batches, weights):
        return self.contrastive_loss.gather_step(batches, weights)

    def loss(self, model, batch, weight=1.0):
        return self.contrastive_loss(model, batch, weight)

    def after_step(self, model) -> None:
        self.contrastive_loss.update_queue(model)

    def finalize(self, model, latitudes, longitudes) -> None:
        model.set_gallery(training_gallery(latitudes, longitudes, self.args.gallery_size, self.args.seed))


DEFAULT_FEATURE_CACHE = os.path.join(
    os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "geoloc", "features"
)


def cache_clip_features(model, image_processor, dataset, cache_dir: str, accelerator, batch_size: int = 256):
    """The frozen CLIP image embeddings of `dataset` as a Dataset (`clip_image_embeds`, `latitude`,
    `longitude`), computed once with a batched `Dataset.map` and kept under `cache_dir` in a folder keyed by
    the image tower's weights, the processor and the dataset's fingerprint. Unreadable images are dropped."""
    key = hashlib.sha256(dataset._fingerprint.encode())
    key.update(json.dumps(image_processor.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.image_tower.state_dict().items()):
        key.update(name.encode())
        key.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    path = os.path.join(cache_dir, key.hexdigest()[:32])
    with accelerator.main_process_first():
        if os.path.isdir(path):
            return datasets.load_from_disk(path)
        tower = model.to(accelerator.device).eval()

        def embed(rows):
            images, kept, _ = decode_images(rows[IMAGE], **image_limits(image_processor))
            embeds = np.zeros((0, model.config.vision_config.projection_dim), dtype=np.float32)
            if images:
                pixel_values = image_processor(images, return_tensors="pt").pixel_values.to(accelerator.device)
                with torch.no_grad():
                    embeds = tower.get_clip_image_embeds(pixel_values).float().cpu().numpy()
            return {"clip_image_embeds": embeds, LATITUDE: [rows[LATITUDE][i] for i in kept],
                    LONGITUDE: [rows[LONGITUDE][i] for i in kept]}

        features = dataset.map(embed, batched=True, batch_size=batch_size, remove_columns=dataset.column_names,
                               new_fingerprint=os.path.basename(path), desc="Caching CLIP image features")
        partial = f"{path}.partial-{os.getpid()}"
        features.save_to_disk(partial)
        os.replace(partial, path)
        return datasets.load_from_disk(path)


class CachedFeatures(torch.utils.data.Dataset):
    """Cached CLIP features held in memory: `clip_image_embeds` `(N, D)` float32 and `locations` `(N, 2)`
    float64 (lat, lon), read once from the feature Dataset as whole columns.

    The DataLoader fetches a batch with one `__getitems__` call (a single tensor index per column) instead of
    N per-row Arrow reads and a collator; its sampler is unchanged, so the seeded order and the skipping of
    used batches on resume are the same as on raw images.
    """

    def __init__(self, features: datasets.Dataset):
        # Arrow, not the numpy formatter: that one returns these float64 columns as float32 here.
        table = features.with_format("arrow")[:]
        embeddings = table["clip_image_embeds"].combine_chunks()
        self.embeddings = torch.from_numpy(
            embeddings.flatten().to_numpy().astype(np.float32).reshape(len(table), -1).copy())
        locations = np.stack([table[LATITUDE].to_numpy(), table[LONGITUDE].to_numpy()], axis=1).astype(np.float64)
        self.locations = torch.from_numpy(locations)

    def __len__(self) -> int:
        return len(self.locations)

    def __getitems__(self, indices: list[int]) -> dict:
        indices = torch.as_tensor(indices, dtype=torch.long)
        return {"clip_image_embeds": self.embeddings[indices], "locations": self.locations[indices],
                "unreadable": 0}

    def __getitem__(self, index: int) -> dict:
        return {"clip_image_embeds": self.embeddings[index], "locations": self.locations[index]}

    @staticmethod
    def collate(batch: dict) -> dict:
        """The DataLoader's `collate_fn`: `__getitems__` already returns the batch."""
        return batch


# ----------------------------------------------------------------------------------------------------- GeoHier
@register_task("geohier")
class GeoHierTask(TrainingTask):
    """GeoHier: label-smoothed cross-entropy per geocell level (+ the scene loss where a scene label is known).

    The geocells come from the training coordinates (`--geocell-levels`, `auto` by default) or from a cell table
    file (`--geocells`, written by `geoloc geocells build|import`); the table is stored in the model."""

    # None: the model config's value (label smoothing 0.1, scene smoothing 0, level weights 0.5,0.3,0.2), and
    # scene labels used where the dataset has them.
    recipe_options = {"geocell_levels": "auto", "label_smoothing": None, "scene_label_smoothing": None,
                      "level_loss_weights": None, "loss_scale": 1.0, "scenes": None}
    default_recipe = "geohier-tiny"

    @classmethod
    def add_arguments(cls, parser) -> None:
        group = parser.add_argument_group("GeoHier")
        group.add_argument("--geocell-levels",
                           help="'auto' (the paper's thresholds scaled to the number of training images) or "
                                "TAU_MIN:TAU_MAX per level, coarse to fine, e.g. 50:5000,50:2000,50:1000, or "
                                "'geoestimation' (the published MP-16 partitions, imported and given with --geocells) "
                                "(recipe default)")
        group.add_argument("--geocells", metavar="FILE",
                           help="train on this cell table (JSON from `geoloc geocells build|import`) instead of "
                                "building one")
        group.add_argument("--scene-column", default=None,
                           help="integer scene label column (0..num_scenes-1, -1 unknown), e.g. MP-16's S16_Label "
                                "(default: 'scene' when the dataset has it)")
        group.add_argument("--num-scenes", type=int, default=None,
                           help="scene types of a new model (default: the tiny config's 4, the paper's 16 with "
                                "--backbone; at least the largest scene label + 1)")
        group.add_argument("--scene-selection", choices=("predicted", "label"), default="predicted",
                           help="whose queries are classified in training: the predicted scene's (as at inference) "
                                "or the labelled scene's")
        group.add_argument("--label-smoothing", type=float,
                           help="of the cell cross-entropies (recipe default; none: the model config's 0.1)")
        group.add_argument("--scene-label-smoothing", type=float,
                           help="of the scene cross-entropy (recipe default; none: the model config's 0)")
        group.add_argument("--level-loss-weights", metavar="W1,W2,...",
                           help="weight of each level's cross-entropy, coarse to fine (recipe default; none: the model "
                                "config's, 0.5,0.3,0.2 for three levels)")
        group.add_argument("--loss-scale", type=float,
                           help="multiply the loss of every step (recipe default: 1; geodecoder-paper 2, as its source "
                                "adds the gradients of 2 accumulated micro-batches)")
        group.add_argument("--scenes", action=argparse.BooleanOptionalAction, default=None,
                           help="--scenes: refuse to train without a scene label column; --no-scenes: train without "
                                "scene labels even where the dataset has them (recipe default; none: use them where "
                                "present)")

    @classmethod
    def check_args(cls, args) -> None:
        if args.cache_features:
            raise ValueError("--cache-features is a GeoCLIP option (GeoHier trains end to end).")
        if args.geocells and "geocell_levels" in args.given_options:
            raise ValueError("Give --geocells FILE or --geocell-levels, not both.")
        if args.geocell_levels == GEOESTIMATION_PARTITIONS and not args.geocells:
            raise ValueError(
                f"--recipe {args.recipe} trains on the published MP-16 partitions of GeoEstimation (Mueller-Budack et "
                "al., ECCV 2018): get cells_50_5000.csv, cells_50_2000.csv and cells_50_1000.csv (geo-cells/ in the "
                "history of TIBHannover/GeoEstimation), run `geoloc geocells import cells_50_5000.csv "
                "cells_50_2000.csv cells_50_1000.csv --output mp16-cells.json` and pass --geocells mp16-cells.json "
                "(or choose --geocell-levels TAU_MIN:TAU_MAX,... to build cells from the training coordinates).")
        if args.num_scenes is not None and args.num_scenes < 1:
            raise ValueError(f"--num-scenes must be >= 1, got {args.num_scenes}.")
        for name in ("label_smoothing", "scene_label_smoothing"):
            value = getattr(args, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}.")
        if not args.loss_scale > 0:
            raise ValueError(f"--loss-scale must be > 0, got {args.loss_scale}.")
        level_loss_weights(args.level_loss_weights)

    def build(self, dataset, latitudes, longitudes) -> None:
        from ..geography.geocells import assign_geocells, geocells_for, load_cell_table

        args = self.args
        if args.geocells:
            self.cells = load_cell_table(args.geocells)
            self.labels = assign_geocells(self.cells, latitudes, longitudes)
            if (self.labels[:, -1] < 0).all():
                raise ValueError(f"No training point falls in a finest cell of {args.geocells}: wrong cell table?")
        else:
            self.cells, self.labels = geocells_for(latitudes, longitudes, args.geocell_levels)
        self.scene_column = self._scene_column(dataset)
        options = dict(cells_per_level=[len(level["tokens"]) for level in self.cells],
                       scene_selection=args.scene_selection, trained_with_scene_labels=self.scene_column is not None)
        losses = dict(label_smoothing=args.label_smoothing, scene_label_smoothing=args.scene_label_smoothing,
                      level_loss_weights=level_loss_weights(args.level_loss_weights))
        options.update({key: value for key, value in losses.items() if value is not None})  # else the config's
        num_scenes = self._num_scenes(dataset)
        if num_scenes is not None:
            options["num_scenes"] = num_scenes
        scene_names = getattr(dataset.features.get(self.scene_column), "names", None) if self.scene_column else None
        if scene_names:  # a ClassLabel scene column names its scenes: shown by name (`id2scene`)
            options["id2scene"] = dict(enumerate(scene_names))
        if args.backbone:
            self.model = GeoHierModel.from_backbone(args.backbone, **options)
            self.image_processor = backbone_image_processor(args.backbone, GeoHierImageProcessor)
        elif args.model_config == "tiny":
            self.model = GeoHierModel(tiny_geohier_config(**options))
            self.image_processor = tiny_image_processor("geohier")
        else:
            self.model = GeoHierModel.from_pretrained(args.model_config, ignore_mismatched_sizes=True, **options)
            self.image_processor = AutoImageProcessor.from_pretrained(args.model_config, trust_remote_code=False)
        if args.augmentation == "geodecoder":  # its evaluation transform goes with it
            self.image_processor = geodecoder_image_processor(processor_input_size(self.image_processor))
        self.model.config.freeze_backbone = not args.train_backbone
        if not args.train_backbone:
            self.model.backbone.requires_grad_(False)
        self.model.set_cell_table(self.cells)

    def _scene_column(self, dataset) -> str | None:
        """The dataset's scene label column: `--scene-column`, else `scene` when present."""
        columns = dataset.column_names or []
        if self.args.scenes is False:
            return None
        if self.args.scenes and self.args.scene_column is None and "scene" not in columns:
            raise ValueError(
                f"--recipe {self.args.recipe} trains with scene labels (GeoGuessNet: MP-16's S16_Label, 16 scenes), "
                f"but the dataset has no 'scene' column (columns: {sorted(columns)}): pass --scene-column NAME, or "
                "--no-scenes to train without scene labels.")
        if self.args.scene_column is not None:
            if self.args.scene_column not in columns:
                raise ValueError(f"--scene-column {self.args.scene_column!r} is not a column of the dataset "
                                 f"(columns: {sorted(columns)}).")
            return self.args.scene_column
        return "scene" if "scene" in columns else None

    def _num_scenes(self, dataset) -> int | None:
        """`--num-scenes`, else enough for the scene labels of a map-style dataset and at least the default of a new
        model (the paper's 16 on a backbone, the tiny config's); None keeps a checkpoint's own."""
        needed = 0
        if self.scene_column is not None and not isinstance(dataset, datasets.IterableDataset):
            labels = np.asarray(dataset[self.scene_column])
            if not np.issubdtype(labels.dtype, np.integer) or (labels < -1).any():
                raise ValueError(f"Scene column {self.scene_column!r} must hold integers >= -1 (-1: unknown).")
            needed = int(labels.max(initial=-1)) + 1
        if self.args.num_scenes is not None:
            if needed > self.args.num_scenes:
                raise ValueError(f"Scene labels go up to {needed - 1} but --num-scenes is {self.args.num_scenes}.")
            return self.args.num_scenes
        if self.args.backbone:
            return max(needed, 16)
        if self.args.model_config == "tiny":
            return max(needed, tiny_geohier_config().num_scenes)
        return needed or None

    def training_data(self, dataset):
        label_columns = ["labels"] + ([SCENE_LABELS] if self.scene_column else [])
        if self.scene_column and self.scene_column != SCENE_LABELS:
            dataset = dataset.rename_column(self.scene_column, SCENE_LABELS)
        if isinstance(dataset, datasets.IterableDataset):  # label each row as it streams by
            from ..geography.geocells import assign_geocells

            cells = self.cells
            dataset = dataset.map(lambda rows: {"labels": assign_geocells(cells, rows[LATITUDE],
                                                                          rows[LONGITUDE]).tolist()}, batched=True)
        else:
            dataset = dataset.add_column("labels", self.labels.tolist())
        return dataset, self.collator(label_columns)

    def loss(self, model, batch, weight=1.0):
        inputs = {key: batch[key] for key in ("pixel_values", "labels", SCENE_LABELS) if key in batch}
        return model(**inputs).loss * (weight * self.args.loss_scale)


# GeoGuessNet's m16_val_transform: Resize(256) + CenterCrop(224) (+ TenCrop(224) with `geoloc evaluate --ten-crop`),
# normalised with the ImageNet statistics (not the in21k ViT's 0.5 / 0.5).
GEODECODER_RESIZE_RATIO = 256 / 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def geodecoder_image_processor(size: tuple[int, int]) -> GeoHierImageProcessor:
    """GeoGuessNet's evaluation transform for a tower of input `size` (height, width): the shorter side resized to
    256/224 of the tower's (bilinear, as torchvision's Resize), then the centre crop the tower takes."""
    height, width = size
    return GeoHierImageProcessor(
        size={"shortest_edge": round(max(height, width) * GEODECODER_RESIZE_RATIO)},
        crop_size={"height": height, "width": width}, do_center_crop=True, resample=PILImageResampling.BILINEAR,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


def level_loss_weights(text: str | None) -> list[float] | None:
    """`--level-loss-weights "1,1,1"` -> [1.0, 1.0, 1.0] (None stays None: the model config's default)."""
    if text is None:
        return None
    try:
        weights = [float(value) for value in str(text).split(",")]
    except ValueError:
        weights = []
    if not weights or not all(weight >= 0 for weight in weights):
        raise ValueError(f"--level-loss-weights must be comma-separated numbers >= 0, one per level, got {text!r}.")
    return weights


def steps_for_epochs(epochs: float, rows: int, batch_size: int) -> int:
    """Optimizer steps in `epochs` passes over `rows` examples at a global batch of `batch_size`."""
    return max(1, math.ceil(epochs * math.ceil(rows / batch_size)))


__all__ = ["TRAINING_TASKS", "GeoCLIPTask", "GeoHierTask", "TrainingTask", "register_task"]
