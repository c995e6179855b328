"""Train GeoCLIP or GeoHier with one readable loop on Hugging Face Accelerate.

    geoloc train --model geoclip --dataset data/worldmap --output-dir runs/geoclip-tiny      # recipe geoclip-tiny
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m geoloc.training.train --model geohier \\
        --dataset data/worldmap --output-dir runs/geohier-tiny                             # 2 CPU processes
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 -m geoloc.training.train \\
        --recipe geoclip-paper --dataset MP16_DIR --output-dir runs/geoclip                # the paper's recipe

**Recipes** (`geoloc.training.recipes`) give every training option a default: `--model geoclip` alone trains with
`geoclip-tiny`, `--recipe geoclip-paper` / `--recipe geodecoder-paper` with the published setups; any option
given on the command line wins; `--dry-run` prints the resolved settings as JSON and stops. `--batch-size` is the
global batch of one optimizer step, split evenly over the processes and `--gradient-accumulation-steps`: the loop
reads a step's micro-batches together, the task sees all of them first (GeoCLIP scores every image against the
whole global batch), and gradients are averaged once per step, so 1 process, N processes and accumulation train
the same weights from the same batches.

**The loop** knows nothing about the models: a task object per model (`geoloc.training.tasks`) builds the model
(tiny random, a checkpoint to fine-tune, or `--backbone` pretrained towers with fresh heads), turns rows into
batches, computes the loss and does what follows a step. Accelerate places the model, runs mixed precision and
multi-process data parallelism. Every process has its own seed (`--seed` + process
index) for augmentation noise and dropout; the data order is seeded by `--seed` alone.

**Checkpoints**: every `--checkpoint-every` steps the whole training state (weights, GeoCLIP's queue,
optimizer, scheduler, every process's RNG) goes to `OUTPUT_DIR/checkpoints/step_XXXXXXXX`, with
`run_settings.json` (what fixes the data order and the schedule) and each process's data position
(`stream_position_<process>.json`: epoch, micro-batches used in it). `--resume` continues from the newest one at
the exact step, and refuses a checkpoint whose settings differ from the run's; an output folder that already
holds a run needs `--resume` or `--overwrite`. The data order of each epoch is a function of the seed and the
epoch (and augmentation draws of the seed, the epoch and the image); the used batches are read again and
dropped.

**Unreadable images** are skipped and counted (`train_summary.json`). A micro-batch in which no image could be
read is skipped on one process; with several, it is replaced (weight 0) by that process's previous batch, so that
every process still takes part in each step (a process skipping a step would stall the others).

`--streaming` trains from a `datasets.IterableDataset` (Hub id or local shards read as they go): a seeded
shuffle buffer, each process reads its own part (`split_dataset_by_node`) and moves on to its next epoch by
itself. The coordinates are read once before training (only the latitude/longitude columns) for GeoCLIP's
gallery and GeoHier's geocells.

The output folder ends up with the model (`save_pretrained`, loadable with `AutoModel.from_pretrained` after
`geoloc.models.register_models()`), its image processor (and tokenizer for GeoCLIP), `log.jsonl`, TensorBoard logs
when tensorboard is installed, and `train_summary.json`.

**Threads** never depend on the machine's load (`geoloc.threads.training_threads`: `--threads`, else
OMP_NUM_THREADS, else the cores divided among this machine's processes): the count is recorded in
`run_settings.json` and `train_summary.json` and `--resume` reuses it, so the same command and seed give the same
weights on a quiet or a busy machine. One run at a time per output folder (`.geoloc.lock`, with its pid), and the
workers of `accelerate launch` end when their launcher dies.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext

import datasets
import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState
from accelerate.utils import is_tensorboard_available, send_to_device, set_seed
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..cli import HelpFormatter
from ..data.dataset import IMAGE, LATITUDE, LONGITUDE, load_geo_dataset
from ..models import register_models
from ..processes import exit_with_launcher, output_lock
from .recipes import OPTIMIZERS, RECIPE_OPTIONS, RECIPES, SCHEDULES, get_recipe
from ..sources import check_local_or_hub
from ..threads import training_threads
from .tasks import TRAINING_TASKS, steps_for_epochs

CHECKPOINTS = "checkpoints"
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")
RUN_SETTINGS = "run_settings.json"
# Options that fix the data order and the schedule: a checkpoint is only resumed with the same values (and with
# every other option that is not in NOT_WEIGHT_SETTINGS: see `run_settings`).
RESUME_SETTINGS = ("model", "dataset", "split", "train_fraction", "streaming", "shuffle_buffer", "seed", "batch_size",
                   "gradient_accumulation_steps", "num_processes", "max_steps", "optimizer", "learning_rate",
                   "schedule", "warmup_steps", "decay_every_epochs", "decay_gamma", "train_rows", "threads")
# Options that cannot change the weights (where outputs go, how often to log or save, worker processes, a trial
# run; which options were given explicitly, their values being compared); a resume may change them. Every other
# option, present or added later, is compared on --resume.
NOT_WEIGHT_SETTINGS = ("output_dir", "overwrite", "resume", "checkpoint_every", "checkpoints_to_keep", "log_every",
                       "push_to_hub", "calibrate_split", "num_workers", "cache_dir", "dry_run", "given_options")


CALIBRATION_ROWS = 5000  # rows of each split that --calibrate-split reads at most


def build_parser() -> argparse.ArgumentParser:
    recipes = "; ".join(f"{name}: {recipe.description}" for name, recipe in RECIPES.items())
    parser = argparse.ArgumentParser(
        prog="geoloc train",
        description="Train GeoCLIP or GeoHier on a geolocation dataset (run under `accelerate launch` for several "
                    "processes). Options marked 'recipe default' take their value from --recipe unless given.",
        epilog=f"Recipes: {recipes}",
        formatter_class=HelpFormatter,
    )
    _add_model_and_data_arguments(parser)
    _add_optimisation_arguments(parser)
    for task in TRAINING_TASKS.values():
        task.add_arguments(parser)
    _add_checkpoint_arguments(parser)
    return parser


def _add_model_and_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and data")
    defaults = ", ".join(f"{task.default_recipe} for --model {name}" for name, task in TRAINING_TASKS.items())
    group.add_argument("--recipe", choices=sorted(RECIPES), help=f"the defaults to train with (default: {defaults})")
    group.add_argument("--model", choices=sorted(TRAINING_TASKS), help="model family (default: the recipe's)")
    group.add_argument("--model-config",
                       help="'tiny' (random toy model from geoloc.configs), or a checkpoint folder / Hub id to continue "
                            "training (recipe default)")
    group.add_argument("--backbone",
                       help="pretrained towers with fresh heads: a CLIP Hub id or folder for GeoCLIP (e.g. "
                            "openai/clip-vit-large-patch14), a ViT or CLIP one for GeoHier (recipe default)")
    group.add_argument("--train-backbone", action=argparse.BooleanOptionalAction, default=None,
                       help="train the image tower too (the GeoCLIP paper freezes it; GeoDecoder fine-tunes it; the "
                            "tiny recipes train their random tower) (recipe default)")
    group.add_argument("--dataset",
                       help="image folder with metadata.csv, parquet/webdataset shards, a save_to_disk folder, or a "
                            "Hub dataset id")
    group.add_argument("--split", default="train", help="split of --dataset")
    group.add_argument("--calibrate-split", default=None,
                       help="after training, fit the calibrated confidence and the unfamiliar-input threshold on this "
                            "held-out split of --dataset (e.g. validation) and the familiarity statistics on --split, "
                            f"at most {CALIBRATION_ROWS:,} rows each (as `geoloc calibrate`)")
    group.add_argument("--image-column", default=IMAGE, help="image column of --dataset")
    group.add_argument("--lat-column", default=LATITUDE, help="latitude column of --dataset")
    group.add_argument("--lon-column", default=LONGITUDE, help="longitude column of --dataset")
    group.add_argument("--train-fraction", type=float, default=1.0,
                       help="train on a seeded random subset of this fraction of the rows")
    group.add_argument("--output-dir", help="where the model and checkpoints are written")
    group.add_argument("--dry-run", action="store_true",
                       help="print every resolved option (recipe values with the command line's overrides) as one "
                            "JSON object and exit, without loading data or weights")
    group.add_argument("--overwrite", action="store_true",
                       help="start over in an --output-dir that already holds a run (its checkpoints are deleted)")
    group.add_argument("--streaming", action="store_true",
                       help="stream the dataset instead of loading it (sets too big for disk): a seeded shuffle "
                            "buffer, one part per process, resume re-reads the used part of the epoch. Not with "
                            "--cache-features or --train-fraction")
    group.add_argument("--shuffle-buffer", type=int, default=10_000,
                       help="examples in the --streaming shuffle buffer")


def _add_optimisation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimisation")
    group.add_argument("--max-steps", type=int, help="optimizer steps (recipe default, or from --epochs)")
    group.add_argument("--epochs", type=float, help="passes over the data, instead of --max-steps (recipe default)")
    group.add_argument("--batch-size", type=int,
                       help="global batch per optimizer step, over all processes and accumulation steps (recipe default)")
    group.add_argument("--gradient-accumulation-steps", type=int, default=1,
                       help="micro-batches per optimizer step")
    group.add_argument("--optimizer", choices=OPTIMIZERS, help="(recipe default)")
    group.add_argument("--learning-rate", type=float, help="(recipe default)")
    group.add_argument("--weight-decay", type=float, help="(recipe default)")
    group.add_argument("--momentum", type=float, help="SGD momentum (recipe default)")
    group.add_argument("--schedule", choices=SCHEDULES,
                       help="cosine: linear warm-up then cosine decay to 0 at the last step; step: warm-up then the "
                            "rate times --decay-gamma every --decay-every-epochs epochs (recipe default)")
    group.add_argument("--warmup-steps", type=int, help="(recipe default)")
    group.add_argument("--decay-every-epochs", type=float, help="step schedule period (recipe default)")
    group.add_argument("--decay-gamma", type=float, help="step schedule factor (recipe default)")
    group.add_argument("--max-grad-norm", type=float, help="gradient clipping, 0: off (recipe default)")
    group.add_argument("--augmentation", choices=("none", "photo", "geodecoder", "map"),
                       help="training image augmentation, see geoloc.training.augment (recipe default)")
    group.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
                       help="default: accelerate's setting (`accelerate launch --mixed_precision`), else no")
    group.add_argument("--seed", type=int, default=0, help="seed of the data order, noise and initialisation")
    group.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    group.add_argument("--threads", type=int, metavar="N",
                       help="torch intra-op threads of each process (default: OMP_NUM_THREADS, else the cores divided "
                            "among this machine's processes; never the machine's load, so runs are reproducible; "
                            "recorded in run_settings.json, and --resume reuses the recorded count)")


def _add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpoints and logging")
    group.add_argument("--checkpoint-every", type=int, default=500, help="save the training state every N steps")
    group.add_argument("--checkpoints-to-keep", type=int, default=2, help="older checkpoints are deleted")
    group.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    group.add_argument("--log-every", type=int, default=10, help="log the loss every N steps")
    group.add_argument("--push-to-hub", metavar="REPO",
                       help="upload the trained model to this Hub repo, as `geoloc publish` does (model, processors, "
                            "card, remote code; never checkpoints or logs)")


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options the user did not give from the recipe (`--recipe`, else the model's default recipe),
    record which ones were given (`args.given_options`), and check them all.

    Raises:
        ValueError: for a recipe of another model, conflicting or impossible options.
    """
    if args.recipe is None and args.model is None:
        raise ValueError("Pass --model (geoclip or geohier) or --recipe.")
    missing = [option for option in ("dataset", "output_dir") if getattr(args, option) is None]
    if missing and not args.dry_run:
        options = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise ValueError(f"the following arguments are required: {options}")
    recipe = get_recipe(args.recipe or TRAINING_TASKS[args.model].default_recipe)
    if args.model is not None and args.model != recipe.model:
        raise ValueError(f"--recipe {recipe.name} trains {recipe.model}, not --model {args.model}.")
    args.model, args.recipe = recipe.model, recipe.name
    task = TRAINING_TASKS[args.model]
    task_options = {name: other.name for other in TRAINING_TASKS.values() for name in other.recipe_options}
    args.given_options = {name for name in (*RECIPE_OPTIONS, *task_options) if getattr(args, name, None) is not None}
    for name in sorted(args.given_options - set(RECIPE_OPTIONS) - set(task.recipe_options)):
        raise ValueError(f"--{name.replace('_', '-')} is a {task_options[name]} option, not one of {args.model}.")
    unknown = set(recipe.model_options) - set(task.recipe_options)
    if unknown:
        raise ValueError(f"Recipe {recipe.name} sets {sorted(unknown)}: not options of the {args.model} task.")
    if {"max_steps", "epochs"} <= args.given_options:
        raise ValueError("Give --max-steps or --epochs, not both.")
    if {"model_config", "backbone"} <= args.given_options:
        raise ValueError("Give --model-config (a tiny model or a checkpoint) or --backbone (pretrained towers), not both.")
    defaults = {**recipe.defaults(), **task.recipe_options, **recipe.model_options}
    if args.given_options & {"max_steps", "epochs"}:  # the user's length replaces the recipe's
        defaults.update(max_steps=None, epochs=None)
    if "model_config" in args.given_options:  # a model to continue: not the recipe's backbone
        defaults["backbone"] = None
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    check_args(args)
    return args


def resolved_settings(args) -> dict:
    """Every option of a resolved run (see `resolve_args`), JSON-safe: what `--dry-run` prints and
    `train_summary.json` records."""
    return {key: value for key, value in vars(args).items() if key not in ("given_options", "dry_run")}


def check_args(args) -> None:
    """Raise ValueError on option values that cannot train."""
    positive = ("batch_size", "gradient_accumulation_steps", "checkpoint_every", "checkpoints_to_keep", "log_every",
                "shuffle_buffer")
    for name in positive + (("max_steps",) if args.max_steps is not None else ()):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.epochs is not None and not args.epochs > 0:
        raise ValueError(f"--epochs must be > 0, got {args.epochs}.")
    if not 0.0 < args.train_fraction <= 1.0:
        raise ValueError(f"--train-fraction must be in (0, 1], got {args.train_fraction}.")
    if not args.learning_rate > 0 or not 0 < args.decay_gamma <= 1 or not args.decay_every_epochs > 0:
        raise ValueError("--learning-rate and --decay-every-epochs must be > 0 and --decay-gamma in (0, 1].")
    for name in ("warmup_steps", "max_grad_norm", "num_workers", "weight_decay", "momentum"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}.")
    if args.streaming and (args.cache_features or args.train_fraction < 1.0):
        raise ValueError("--cache-features and --train-fraction need the whole dataset: not with --streaming.")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --output-dir and --overwrite starts it over: pick one.")
    TRAINING_TASKS[args.model].check_args(args)


# --------------------------------------------------------------------------------------------------- data
def training_coordinates(dataset) -> tuple[np.ndarray, np.ndarray]:
    """(latitudes, longitudes) of every training row; a streaming dataset is read once for them, only these
    two columns."""
    if not isinstance(dataset, datasets.IterableDataset):
        return np.asarray(dataset[LATITUDE]), np.asarray(dataset[LONGITUDE])
    latitudes, longitudes = [], []
    for rows in dataset.select_columns([LATITUDE, LONGITUDE]).iter(batch_size=65_536):
        latitudes.extend(rows[LATITUDE])
        longitudes.extend(rows[LONGITUDE])
    return np.asarray(latitudes, dtype=np.float64), np.asarray(longitudes, dtype=np.float64)


def micro_batch_size(args, num_processes: int) -> int:
    """Images per process per micro-batch: the global `--batch-size` split over processes and accumulation."""
    parts = num_processes * args.gradient_accumulation_steps
    if args.batch_size % parts:
        raise ValueError(
            f"--batch-size {args.batch_size} (the global batch) must be divisible by the {num_processes} process(es) "
            f"x {args.gradient_accumulation_steps} accumulation step(s) = {parts}."
        )
    return args.batch_size // parts


def training_dataloader(dataset, collate, batch_size: int, args, accelerator) -> DataLoader:
    """The training DataLoader. Map-style: reshuffled every epoch (accelerate's seedable sampler orders it by
    seed and epoch; `accelerator.prepare` splits it across processes). Streaming: a seeded shuffle buffer and
    this process's part of the stream (`split_dataset_by_node`); it is not prepared, `BatchStream` moves its
    batches to the device.

    The loader's own generator keeps iterator creation off the global RNG, so a resumed run draws the same
    GPS noise and dropout as an uninterrupted one."""
    generator = torch.Generator().manual_seed(args.seed)
    if not args.streaming:
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate,
                          num_workers=args.num_workers, generator=generator)
    dataset = dataset.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer)
    dataset = split_dataset_by_node(dataset, rank=accelerator.process_index, world_size=accelerator.num_processes)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=args.num_workers,
                      generator=generator)


class BatchStream:
    """The micro-batches of a DataLoader, epoch after epoch without end, from a position (`epoch`, `batches`
    already used in it): each epoch's order is reseeded (`set_epoch` of the loader or the streaming dataset, and
    `on_epoch(epoch)`, e.g. the augmentation's epoch) and the used batches are skipped, so the stream continues
    exactly where a checkpoint left it. Batches are put on the accelerator's device."""

    def __init__(self, dataloader, accelerator, on_epoch, epoch: int = 0, batches: int = 0):
        self.dataloader, self.accelerator, self.on_epoch = dataloader, accelerator, on_epoch
        self.epoch, self.batches = epoch, batches

    def __iter__(self):
        while True:
            if isinstance(self.dataloader.dataset, datasets.IterableDataset):
                self.dataloader.dataset.set_epoch(self.epoch)
            else:  # accelerate's prepared loader reseeds its sampler
                self.dataloader.set_epoch(self.epoch)
            self.on_epoch(self.epoch)
            used = self.batches
            for batch in self.accelerator.skip_first_batches(self.dataloader, used) if used else self.dataloader:
                self.batches += 1
                yield send_to_device(batch, self.accelerator.device)
            if self.batches == used == 0:
                raise ValueError("An epoch gave this process no batch: too few rows for the number of processes.")
            self.epoch, self.batches = self.epoch + 1, 0

    def position(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches}


class StepBatches:
    """The micro-batches of one optimizer step at a time: `next()` gives `(batches, weights)`, `accumulation`
    micro-batches of this process in stream order. A micro-batch in which no image could be read is skipped in
    one process; with several, every process must take part in each micro-batch, so it is replaced by this
    process's previous readable one with weight 0. `unreadable` counts the images skipped so far."""

    def __init__(self, stream: BatchStream, accumulation: int, num_processes: int):
        self.micro_batches, self.accumulation, self.num_processes = iter(stream), accumulation, num_processes
        self.last_readable, self.unreadable = None, 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[list[dict], list[float]]:
        batches, weights = [], []
        while len(batches) < self.accumulation:
            batch = next(self.micro_batches)
            self.unreadable += int(batch.pop("unreadable"))
            weight = 1.0
            if len(batch["locations"]) == 0:
                if self.num_processes == 1:
                    continue  # nothing to learn from, nobody to keep in step
                if self.last_readable is None:
                    raise ValueError("No image of this process's first batch could be read: check the dataset's images.")
                batch, weight = self.last_readable, 0.0
            self.last_readable = batch
            batches.append(batch)
            weights.append(weight)
        return batches, weights


# ------------------------------------------------------------------------------------------ optimisation
def build_optimizer(args, parameters) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (with momentum) over `parameters`, as `--optimizer` says."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=args.learning_rate, momentum=args.momentum,
                               weight_decay=args.weight_decay)
    optimizer = torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW
    return optimizer(parameters, lr=args.learning_rate, weight_decay=args.weight_decay)


def build_scheduler(args, optimizer, max_steps: int, steps_per_epoch: int):
    """Linear warm-up, then cosine decay to 0 at `max_steps`, or a step decay by `decay_gamma` every
    `decay_every_epochs` epochs (of `steps_per_epoch` optimizer steps)."""
    warmup = min(args.warmup_steps, max_steps)
    if args.schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, max_steps)
    period = max(1, round(args.decay_every_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup if warmup else 1.0) * args.decay_gamma ** (step // period)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_steps(output_dir: str) -> list[int]:
    """Steps of the complete checkpoints in `output_dir`, oldest first."""
    folder = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(folder):
        return []
    return sorted(int(name[5:]) for name in os.listdir(folder) if name.startswith("step_") and name[5:].isdigit())


def stream_position_file(checkpoint: str, process_index: int) -> str:
    """Where a checkpoint keeps one process's `BatchStream.position()`."""
    return os.path.join(checkpoint, f"stream_position_{process_index}.json")


def prepare_output_dir(args, accelerator) -> None:
    """Refuse to mix two runs in one folder: one that already holds a run needs `--resume` (continue it) or
    `--overwrite` (its checkpoints and logs are deleted first); one that holds a saved model but no run (a
    `--model-config` folder, a downloaded checkpoint) is replaced only with `--overwrite`."""
    names = (CHECKPOINTS, "log.jsonl", "train_summary.json", "tensorboard")
    holds_run = [name for name in names if os.path.exists(os.path.join(args.output_dir, name))]
    if holds_run and not (args.resume or args.overwrite):
        raise ValueError(
            f"--output-dir {args.output_dir} already holds a training run ({', '.join(holds_run)}): pass --resume to "
            "continue it, --overwrite to start over there, or choose a new folder."
        )
    saved_model = [name for name in MODEL_FILES if os.path.exists(os.path.join(args.output_dir, name))]
    if saved_model and not holds_run and not args.overwrite:  # e.g. --output-dir is the --model-config folder
        raise ValueError(
            f"--output-dir {args.output_dir} holds a saved model ({', '.join(saved_model)}) that training would "
            "replace: choose a new folder, or pass --overwrite to replace it."
        )
    if args.overwrite and accelerator.is_main_process:
        for name in holds_run:
            path = os.path.join(args.output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    accelerator.wait_for_everyone()


def run_settings(args, **run_values) -> dict:
    """What a resume must keep (JSON-safe): every option of this run (the task's own options included, whatever
    they are) except `NOT_WEIGHT_SETTINGS`, and `run_values` known only once the run started (`max_steps`,
    `num_processes`, `train_rows`); `RESUME_SETTINGS` are always among them."""
    values = {**vars(args), **run_values}
    names = set(RESUME_SETTINGS) | set(values) - set(NOT_WEIGHT_SETTINGS)
    return json.loads(json.dumps({name: values[name] for name in sorted(names)}, default=_json_value))


def _json_value(value):
    """A setting JSON cannot hold: a set sorted (its order varies between runs), anything else as its text."""
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)


def check_resume_settings(checkpoint: str, settings: dict) -> None:
    """Refuse to resume a checkpoint made with other settings (any that can change the weights), naming each."""
    path = os.path.join(checkpoint, RUN_SETTINGS)
    if not os.path.isfile(path):
        raise ValueError(f"{checkpoint} has no {RUN_SETTINGS}: it was not written by this version of geoloc train.")
    with open(path) as handle:
        saved = json.load(handle)
    changed = [f"{name}={saved[name]!r} (now {settings[name]!r})" if name in saved else f"{name} (not recorded)"
               for name in settings if saved.get(name) != settings[name] or name not in saved]
    if changed:
        raise ValueError(
            f"--resume: {checkpoint} was made with other settings: {', '.join(changed)}. Rerun with the checkpoint's "
            "settings, or train into a new --output-dir (or --overwrite)."
        )


def save_checkpoint(accelerator, output_dir: str, step: int, keep: int, settings: dict, stream_position: dict) -> None:
    """Save the training state to `checkpoints/step_XXXXXXXX` atomically (a killed save leaves no half
    checkpoint behind) with `run_settings.json`, and delete all but the newest `keep` checkpoints.
    `stream_position` (this process's `BatchStream.position()`) goes next to it as JSON: where its data resumes."""
    folder = os.path.join(output_dir, CHECKPOINTS)
    final, partial = os.path.join(folder, f"step_{step:08d}"), os.path.join(folder, f"partial_{step:08d}")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
        os.makedirs(partial)
    accelerator.wait_for_everyone()  # before any process writes its RNG state into it
    # Weights go to safetensors; accelerate always torch.saves the optimizer, scheduler and RNG states
    # (files this run wrote itself, read back only by --resume).
    accelerator.save_state(partial, safe_serialization=True)
    with open(stream_position_file(partial, accelerator.process_index), "w") as handle:
        json.dump(stream_position, handle)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(partial, RUN_SETTINGS), "w") as handle:
            json.dump(settings, handle, indent=2)
        os.replace(partial, final)
        for old in checkpoint_steps(output_dir)[:-keep]:
            shutil.rmtree(os.path.join(folder, f"step_{old:08d}"))
    accelerator.wait_for_everyone()


def choose_threads(args) -> int:
    """Set torch's threads for this run and return the count: the one recorded in the checkpoint that `--resume`
    continues (a resumed run must compute its sums as the first part did), else `training_threads(--threads)`.

    Raises:
        ValueError: `--threads` other than the recorded count of the run to resume.
    """
    recorded = None
    if args.resume and checkpoint_steps(args.output_dir):
        step = checkpoint_steps(args.output_dir)[-1]
        path = os.path.join(args.output_dir, CHECKPOINTS, f"step_{step:08d}", RUN_SETTINGS)
        if os.path.isfile(path):
            with open(path) as handle:
                recorded = json.load(handle).get("threads")
    if recorded is not None and args.threads not in (None, recorded):
        raise ValueError(f"--threads {args.threads}: the run in {args.output_dir} trained with {recorded} threads "
                         f"and resumes with them (its weights would differ otherwise); leave --threads out.")
    threads = recorded or training_threads(args.threads)
    torch.set_num_threads(threads)
    return threads


# -------------------------------------------------------------------------------------------------- train
def main(argv=None) -> int:
    args = resolve_args(build_parser().parse_args(argv))
    if args.dry_run:
        print(json.dumps(resolved_settings(args), indent=2, sort_keys=True))
        return 0
    check_local_or_hub(args.dataset, "--dataset", patterns=True)  # before anything is loaded
    register_models()  # --model-config and --backbone checkpoints are read through the Auto classes
    args.threads = choose_threads(args)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with="tensorboard" if is_tensorboard_available() else None,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        step_scheduler_with_optimizer=False,
    )
    exit_with_launcher()  # a worker whose launcher was killed must not train on beside a rerun
    lock = os.path.join(args.output_dir, ".geoloc.lock")  # one run per --output-dir at a time
    distributed = accelerator.num_processes > 1
    try:
        with output_lock(lock, f"--output-dir {args.output_dir}") if accelerator.is_main_process else nullcontext():
            status = train(args, accelerator)
    finally:  # accelerate keeps its settings process-wide: a later run in this Python may want others
        AcceleratorState._reset_state()
    if distributed:  # everything is saved and every process is past its last collective: skip the teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def training_rows(args: argparse.Namespace):
    """The rows `args` trains on: `(dataset, latitudes, longitudes)`, `--train-fraction` applied (the same rows
    for a seed), the coordinates of the valid rows as numpy arrays.

    Raises:
        ValueError: when no valid row is left.
    """
    dataset = load_geo_dataset(args.dataset, args.split, image_column=args.image_column,
                               lat_column=args.lat_column, lon_column=args.lon_column, streaming=args.streaming)
    if args.train_fraction < 1.0:
        count = max(1, round(args.train_fraction * len(dataset)))
        rows = np.random.default_rng(args.seed).choice(len(dataset), count, replace=False)
        dataset = dataset.select(np.sort(rows))
    latitudes, longitudes = training_coordinates(dataset)
    if len(latitudes) == 0:
        raise ValueError(f"No valid rows to train on in '{args.dataset}' ({args.split}).")
    return dataset, latitudes, longitudes


def resume_position(args, accelerator, dataloader, task, settings: dict, max_steps: int) -> tuple[int, BatchStream]:
    """`(step, batch stream)` to start from: the newest checkpoint's state (loaded into `accelerator`) with
    `--resume`, else step 0 at the start of the data."""
    if args.resume and checkpoint_steps(args.output_dir):
        step = checkpoint_steps(args.output_dir)[-1]
        checkpoint = os.path.join(args.output_dir, CHECKPOINTS, f"step_{step:08d}")
        check_resume_settings(checkpoint, settings)
        accelerator.load_state(checkpoint)
        with open(stream_position_file(checkpoint, accelerator.process_index)) as handle:
            stream = BatchStream(dataloader, accelerator, task.set_epoch, **json.load(handle))
        accelerator.print(f"Resumed from step {step:,} of {max_steps:,} ({checkpoint}).")
        return step, stream
    if args.resume:
        accelerator.print(f"No checkpoint in {args.output_dir}: starting from step 0.")
    return 0, BatchStream(dataloader, accelerator, task.set_epoch)


def optimizer_step(args, accelerator, task, model, step_batches, optimizer, scheduler, trainable) -> tuple[list, int]:
    """One optimizer step = `gradient_accumulation_steps` micro-batches per process; returns the micro-batches'
    losses (detached) and the samples this process saw."""
    batches, weights = next(step_batches)
    batches = task.start_step(batches, weights)
    losses, samples = [], 0
    for index, (batch, weight) in enumerate(zip(batches, weights)):
        # Gradients are averaged across processes once, on the step's last micro-batch.
        last = index == len(batches) - 1
        with nullcontext() if last else accelerator.no_sync(model):
            loss = task.loss(model, batch, weight)
            accelerator.backward(loss / len(batches))
        losses.append(loss.detach())
        samples += int(weight) * len(batch["locations"])
    if args.max_grad_norm:
        accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    task.after_step(model)
    if not accelerator.optimizer_step_was_skipped:  # fp16: no scheduler step where the scaler skipped one
        scheduler.step()
    return losses, samples


def log_step(accelerator, progress, log_path: str, step: int, epoch: int, lr: float, samples_per_second: float,
             step_losses: list) -> None:
    """Log one step (its loss averaged over the step's micro-batches and the processes) to the trackers, the
    progress bar and `log.jsonl`."""
    loss_value = accelerator.reduce(torch.stack(step_losses).mean(), "mean").item()
    record = {"step": step, "epoch": epoch, "loss": loss_value, "lr": lr, "samples_per_second": samples_per_second}
    accelerator.log(record, step=step)
    progress.set_postfix(loss=f"{loss_value:.4f}")
    if accelerator.is_main_process:
        with open(log_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


# The DDP model of a finished multi-process run, never freed: its process exits with `os._exit` (see `main`).
# Gloo's worker threads keep the last work they ran (with its tensors) until the process group is destroyed, which
# happens when the DDP model is freed; a Python-owned tensor freed there needs the GIL, which the main thread holds
# while it destroys the group: a process then hung after saving, now and then, on 2 CPU processes (keeping only
# the last gathered tensors alive was not enough: a worker hung in that teardown on 2026-12-03).
_FINISHED_DDP_MODELS: list[torch.nn.Module] = []


def gather_per_process(accelerator, *values: int) -> list[list[int]]:
    """Each integer of `values` from every process: one list per value, in process order."""
    if accelerator.num_processes == 1:
        return [[value] for value in values]
    local = torch.tensor(values, device=accelerator.device)
    gathered = [torch.empty_like(local) for _ in range(accelerator.num_processes)]
    torch.distributed.all_gather(gathered, local)
    return torch.stack(gathered).T.tolist()


def save_trained(args, accelerator, task, model, latitudes, longitudes, step: int, samples_seen: int,
                 unreadable: int, started: float) -> None:
    """Save the model (+ gallery or cell table), its processors and `train_summary.json` (main process), and
    push them with `--push-to-hub`."""
    counts, skipped = gather_per_process(accelerator, samples_seen, unreadable)
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model)
    if not accelerator.is_main_process:
        return
    task.finalize(model, latitudes, longitudes)
    task.save(model, args.output_dir)
    summary = {"model": args.model, "recipe": args.recipe, "steps": step, "num_processes": accelerator.num_processes,
               "threads": args.threads,
               "samples_per_process": counts, "unreadable_images_per_process": skipped,
               "train_rows": len(latitudes), "seconds": round(time.perf_counter() - started, 1),
               "args": resolved_settings(args)}
    with open(os.path.join(args.output_dir, "train_summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    if args.calibrate_split:  # before publishing: the card shows the calibration
        from ..inference.calibration import main as calibrate

        calibrate([args.output_dir, "--dataset", args.dataset, "--split", args.calibrate_split,
                   "--statistics-split", args.split, "--max-samples", str(CALIBRATION_ROWS),
                   "--image-column", args.image_column, "--lat-column", args.lat_column,
                   "--lon-column", args.lon_column])
    if args.push_to_hub:  # the files `geoloc publish` uploads: the model, its card and remote code, no state
        from ..hub.publish import publish

        publish(args.output_dir, args.push_to_hub,
                training_data=f"Trained with `geoloc train` (recipe {args.recipe}) on {args.dataset!r}.")
    print(f"Saved the trained {args.model} to {args.output_dir} ({step} steps"
          f"{f', {sum(skipped)} unreadable images skipped' if sum(skipped) else ''}).", file=sys.stderr)


def train(args: argparse.Namespace, accelerator: Accelerator) -> int:
    """The training run of resolved `args` (see `resolve_args`) on `accelerator`."""
    prepare_output_dir(args, accelerator)
    set_seed(args.seed)  # the same model on every process
    task = TRAINING_TASKS[args.model](args, accelerator)
    dataset, latitudes, longitudes = training_rows(args)
    batch_size = micro_batch_size(args, accelerator.num_processes)
    steps_per_epoch = math.ceil(len(latitudes) / args.batch_size)
    max_steps = args.max_steps or steps_for_epochs(args.epochs, len(latitudes), args.batch_size)
    settings = run_settings(args, max_steps=max_steps, num_processes=accelerator.num_processes,
                            train_rows=len(latitudes))

    # model, batches, optimisation
    task.build(dataset, latitudes, longitudes)
    train_data, collate = task.training_data(dataset)
    dataloader = training_dataloader(train_data, collate, batch_size, args, accelerator)
    model = task.model
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = build_optimizer(args, trainable)
    scheduler = build_scheduler(args, optimizer, max_steps, steps_per_epoch)
    if args.streaming:  # already split across processes by `training_dataloader`
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)
    set_seed(args.seed, device_specific=True)  # from here each process draws its own noise and dropout

    step, stream = resume_position(args, accelerator, dataloader, task, settings, max_steps)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    hparams = {key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))}
    accelerator.init_trackers("tensorboard", config=hparams)

    progress = tqdm(total=max_steps, initial=step, desc=f"Training {args.model} ({args.recipe})",
                    disable=not accelerator.is_local_main_process)
    samples_seen, started = 0, time.perf_counter()
    log_path = os.path.join(args.output_dir, "log.jsonl")
    model.train()
    step_batches = StepBatches(stream, args.gradient_accumulation_steps, accelerator.num_processes)
    while step < max_steps:
        step_losses, samples = optimizer_step(args, accelerator, task, model, step_batches, optimizer, scheduler,
                                              trainable)
        samples_seen += samples
        step += 1
        progress.update(1)
        if step % args.log_every == 0 or step == max_steps:
            throughput = samples_seen * accelerator.num_processes / (time.perf_counter() - started)
            log_step(accelerator, progress, log_path, step, stream.epoch, scheduler.get_last_lr()[0], throughput,
                     step_losses)
        if step % args.checkpoint_every == 0:
            save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_to_keep, settings, stream.position())
    progress.close()
    save_trained(args, accelerator, task, model, latitudes, longitudes, step, samples_seen, step_batches.unreadable,
                 started)
    accelerator.end_training()
    if accelerator.num_processes > 1:
        _FINISHED_DDP_MODELS.append(model)
    return 0


if __name__ == "__main__":
    from ..cli import run_command

    run_command("train")
