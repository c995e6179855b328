"""Train GeoCLIP or GeoHier with one readable loop on Hugging Face Accelerate.

    accelerate launch [--num_processes N] -m geoloc.train --model geoclip --model-config tiny \\
        --dataset data/worldmap --output-dir runs/geoclip-tiny --max-steps 500 --batch-size 64
    geoloc train --model geohier --model-config tiny --dataset data/worldmap --output-dir runs/geohier-tiny

Accelerate places the model, runs mixed precision, gradient accumulation and multi-process data parallelism.
Every `--checkpoint-every` optimizer steps the whole training state (model with its GPS queue buffer,
optimizer, scheduler, every process's RNG) goes to `OUTPUT_DIR/checkpoints/step_XXXXXXXX`; `--resume`
continues from the newest one at the exact step: the data order of each epoch is a function of the seed and
the epoch, and the batches of the current epoch that were already used are skipped.

`--streaming` trains from a `datasets.IterableDataset` (Hub id or local shards read as they go, for sets too
big for disk): a seeded shuffle buffer (the order is a function of the seed and the epoch), each process reads
its own part (`datasets.distributed.split_dataset_by_node`) and moves on to its next epoch by itself, so
processes never wait on each other's epoch end. Each checkpoint also gets `stream_position_<process>.json`
(epoch, micro-batches used in it); `--resume` reads those batches again and drops them. The coordinates are
read once before training (only the latitude/longitude columns) for GeoCLIP's gallery and GeoHier's geocells.

GeoCLIP trains its image MLP, location encoder and temperature (the CLIP towers stay frozen) with the
contrastive loss against the batch and the GPS queue; the coordinates of every process's batch are gathered
and enqueued on every process, so the queues stay identical. `--cache-features` computes the frozen CLIP
image embeddings once (cached on disk, keyed by the image tower, processor and dataset) and trains on them,
held in memory as tensors.
GeoHier gets geocells built from the training coordinates (`geoloc.geocells.build_geocells`), stored in the
model as its cell table, and trains end to end on the per-level cell labels (+ `scene` when the dataset has
that column).

The output folder ends up with the model (`save_pretrained`, loadable with `AutoModel.from_pretrained` after
`import geoloc`), its image processor (and tokenizer for GeoCLIP), `log.jsonl` (one JSON line per logged step),
TensorBoard logs when tensorboard is installed, and `train_summary.json`. A trained GeoCLIP's retrieval
gallery is its (deduplicated, at most `--gallery-size`) training coordinates.
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import time

import datasets
import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import is_tensorboard_available, send_to_device, set_seed
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoTokenizer, get_cosine_schedule_with_warmup

from modeling_geoclip import GeoCLIPImageProcessor, GeoCLIPModel, byte_level_clip_tokenizer
from modeling_geohier import GeoHierModel

from .cli import HelpFormatter
from .configs import TINY_IMAGE_SIZE, tiny_geoclip_config, tiny_geohier_config
from .data import IMAGE, LATITUDE, LONGITUDE, GeoCollator, decode_images, load_geo_dataset

logger = get_logger(__name__)

KM_PER_DEGREE = 111.195  # one degree of latitude on the mean Earth sphere
CHECKPOINTS = "checkpoints"
DEFAULT_FEATURE_CACHE = os.path.join(
    os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "geoloc", "features"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geoloc train",
        description="Train GeoCLIP or GeoHier on a geolocation dataset (run under `accelerate launch` for "
                    "several processes).",
        formatter_class=HelpFormatter,
    )
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", choices=("geoclip", "geohier"), required=True, help="which model to train")
    group.add_argument("--model-config", default="tiny",
                       help="'tiny' (random toy model from geoloc.configs), or a checkpoint folder / Hub id to "
                            "start from")
    group.add_argument("--dataset", required=True,
                       help="image folder with metadata.csv, parquet/webdataset shards, or a Hub dataset id")
    group.add_argument("--split", default="train", help="split of --dataset")
    group.add_argument("--image-column", default=IMAGE, help="image column of --dataset")
    group.add_argument("--lat-column", default=LATITUDE, help="latitude column of --dataset")
    group.add_argument("--lon-column", default=LONGITUDE, help="longitude column of --dataset")
    group.add_argument("--train-fraction", type=float, default=1.0,
                       help="train on a seeded random subset of this fraction of the rows")
    group.add_argument("--output-dir", required=True, help="where the model and checkpoints are written")
    group.add_argument("--streaming", action="store_true",
                       help="stream the dataset instead of loading it (sets too big for disk): a seeded shuffle "
                            "buffer, one part per process, resume re-reads the used part of the epoch. One pass "
                            "over only the latitude/longitude columns comes first (GeoCLIP gallery, GeoHier "
                            "geocells). Not with --cache-features or --train-fraction")
    group.add_argument("--shuffle-buffer", type=int, default=10_000,
                       help="examples in the --streaming shuffle buffer")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    group.add_argument("--batch-size", type=int, default=32, help="images per process per micro-batch")
    group.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per step")
    group.add_argument("--learning-rate", type=float, default=3e-4, help="peak learning rate (AdamW)")
    group.add_argument("--weight-decay", type=float, default=1e-6, help="AdamW weight decay")
    group.add_argument("--warmup-steps", type=int, default=100,
                       help="linear warm-up, then cosine decay to 0 at --max-steps")
    group.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    group.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                       help="autocast dtype of the forward pass")
    group.add_argument("--seed", type=int, default=0, help="seed of the data order, noise and initialisation")
    group.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")

    group = parser.add_argument_group("GeoCLIP")
    group.add_argument("--gps-noise-km", type=float, default=0.0,
                       help="GPS augmentation: Gaussian noise of this many km on the training coordinates")
    group.add_argument("--cache-features", action="store_true",
                       help="precompute the frozen CLIP image embeddings once and train on them")
    group.add_argument("--cache-dir", default=DEFAULT_FEATURE_CACHE, help="where cached features are kept")
    group.add_argument("--gallery-size", type=int, default=100_000,
                       help="cap on the gallery of training coordinates saved with the model")

    group = parser.add_argument_group("GeoHier")
    group.add_argument("--geocell-levels", default="50:5000,50:2000,50:1000",
                       help="tau_min:tau_max per geocell level, coarse to fine")

    group = parser.add_argument_group("checkpoints and logging")
    group.add_argument("--checkpoint-every", type=int, default=500, help="save the training state every N steps")
    group.add_argument("--checkpoints-to-keep", type=int, default=2, help="older checkpoints are deleted")
    group.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    group.add_argument("--log-every", type=int, default=10, help="log the loss every N steps")
    group.add_argument("--push-to-hub", metavar="REPO", help="upload the trained model to this Hub repo")
    return parser


def check_args(args) -> None:
    """Raise ValueError on option values that cannot train."""
    positive = ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every",
                "checkpoints_to_keep", "log_every", "gallery_size", "shuffle_buffer")
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if not 0.0 < args.train_fraction <= 1.0:
        raise ValueError(f"--train-fraction must be in (0, 1], got {args.train_fraction}.")
    if args.warmup_steps < 0 or args.gps_noise_km < 0 or args.max_grad_norm < 0 or args.num_workers < 0:
        raise ValueError("--warmup-steps, --gps-noise-km, --max-grad-norm and --num-workers must be >= 0.")
    if args.model == "geohier" and (args.cache_features or args.gps_noise_km):
        raise ValueError("--cache-features and --gps-noise-km are GeoCLIP options (GeoHier trains end to end).")
    if args.streaming and (args.cache_features or args.train_fraction < 1.0):
        raise ValueError("--cache-features and --train-fraction need the whole dataset: not with --streaming.")


def parse_geocell_levels(text: str) -> list[tuple[int, int]]:
    """'50:5000,50:2000' -> [(50, 5000), (50, 2000)]."""
    try:
        return [tuple(int(value) for value in level.split(":", 1)) for level in text.split(",")]
    except ValueError:
        raise ValueError(f"--geocell-levels must look like '50:5000,50:2000,50:1000', got {text!r}.") from None


# ------------------------------------------------------------------------------------------------- models
def tiny_image_processor() -> GeoCLIPImageProcessor:
    """The image processor of the tiny configs: resize and centre-crop to 32 px, CLIP normalisation."""
    return GeoCLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE},
                                 crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})


def build_geoclip(model_config: str):
    """(model, image processor, tokenizer): the tiny random GeoCLIP, or a GeoCLIP checkpoint to fine-tune."""
    if model_config == "tiny":
        return GeoCLIPModel(tiny_geoclip_config()), tiny_image_processor(), byte_level_clip_tokenizer()
    return (GeoCLIPModel.from_pretrained(model_config), AutoImageProcessor.from_pretrained(model_config),
            AutoTokenizer.from_pretrained(model_config))


def build_geohier(model_config: str, cells: list[dict]):
    """(model, image processor): GeoHier with one classifier per level of `cells`, the table stored in it.
    Starting from a checkpoint keeps its backbone and decoder and re-initialises the cell classifiers."""
    cells_per_level = [len(level["tokens"]) for level in cells]
    if model_config == "tiny":
        model, processor = GeoHierModel(tiny_geohier_config(cells_per_level=cells_per_level)), tiny_image_processor()
    else:
        model = GeoHierModel.from_pretrained(model_config, cells_per_level=cells_per_level,
                                             ignore_mismatched_sizes=True)
        processor = AutoImageProcessor.from_pretrained(model_config)
    model.set_cell_table(cells)
    return model, processor


# --------------------------------------------------------------------------------------------------- data
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
            images, kept, _ = decode_images(rows[IMAGE])
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
        columns = features.with_format("numpy")[:]
        self.embeddings = torch.from_numpy(np.asarray(columns["clip_image_embeds"], dtype=np.float32))
        locations = np.stack([columns[LATITUDE], columns[LONGITUDE]], axis=1).astype(np.float64)
        self.locations = torch.from_numpy(locations)

    def __len__(self) -> int:
        return len(self.locations)

    def __getitems__(self, indices: list[int]) -> dict:
        indices = torch.as_tensor(indices, dtype=torch.long)
        return {"clip_image_embeds": self.embeddings[indices], "locations": self.locations[indices]}

    def __getitem__(self, index: int) -> dict:
        return {"clip_image_embeds": self.embeddings[index], "locations": self.locations[index]}

    @staticmethod
    def collate(batch: dict) -> dict:
        """The DataLoader's `collate_fn`: `__getitems__` already returns the batch."""
        return batch


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


def training_dataloader(dataset, collate, args, accelerator) -> DataLoader:
    """The training DataLoader. Map-style: reshuffled every epoch (accelerate's seedable sampler orders it by
    seed and epoch; `accelerator.prepare` splits it across processes). Streaming: a seeded shuffle buffer and
    this process's part of the stream (`split_dataset_by_node`); it is not prepared, `BatchStream` moves its
    batches to the device.

    The loader's own generator keeps iterator creation off the global RNG, so a resumed run draws the same
    GPS noise and dropout as an uninterrupted one."""
    generator = torch.Generator().manual_seed(args.seed)
    if not args.streaming:
        return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                          num_workers=args.num_workers, generator=generator)
    dataset = dataset.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer)
    dataset = split_dataset_by_node(dataset, rank=accelerator.process_index, world_size=accelerator.num_processes)
    return DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate, num_workers=args.num_workers,
                      generator=generator)


class BatchStream:
    """The micro-batches of a DataLoader, epoch after epoch without end, from a position (`epoch`, `batches`
    already used in it): `set_epoch` reseeds each epoch's order and the used batches are skipped, so the
    stream continues exactly where a checkpoint left it. Batches are put on the accelerator's device."""

    def __init__(self, dataloader, accelerator, epoch: int = 0, batches: int = 0):
        self.dataloader, self.accelerator, self.epoch, self.batches = dataloader, accelerator, epoch, batches

    def __iter__(self):
        while True:
            # a prepared map-style loader and a streaming `datasets.IterableDataset` each know `set_epoch`
            (self.dataloader if hasattr(self.dataloader, "set_epoch") else self.dataloader.dataset).set_epoch(
                self.epoch)
            used = self.batches
            for batch in self.accelerator.skip_first_batches(self.dataloader, used) if used else self.dataloader:
                self.batches += 1
                yield send_to_device(batch, self.accelerator.device)
            if self.batches == used == 0:
                raise ValueError("An epoch gave this process no batch: too few rows for the number of processes.")
            self.epoch, self.batches = self.epoch + 1, 0

    def position(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches}


def add_gps_noise(locations: torch.Tensor, km: float) -> torch.Tensor:
    """GeoCLIP's GPS augmentation: move each (lat, lon) of `locations` (B, 2) by Gaussian noise of std `km`
    kilometres; latitudes are clamped at the poles and longitudes wrapped into [-180, 180)."""
    noise = torch.randn_like(locations) * (km / KM_PER_DEGREE)
    latitude = (locations[:, 0] + noise[:, 0]).clamp(-90, 90)
    longitude = locations[:, 1] + noise[:, 1] / torch.cos(torch.deg2rad(latitude)).clamp(min=1e-2)
    return torch.stack([latitude, torch.remainder(longitude + 180, 360) - 180], dim=1)


def gallery_locations(latitudes, longitudes, size: int, seed: int) -> np.ndarray:
    """The training coordinates, deduplicated (to the microdegree), at most `size` of them (seeded subset)."""
    points = np.unique(np.round(np.stack([latitudes, longitudes], axis=1), 6), axis=0)
    if len(points) > size:
        points = points[np.sort(np.random.default_rng(seed).choice(len(points), size, replace=False))]
    return points


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_steps(output_dir: str) -> list[int]:
    """Steps of the complete checkpoints in `output_dir`, oldest first."""
    folder = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(folder):
        return []
    return sorted(int(name[5:]) for name in os.listdir(folder) if name.startswith("step_") and name[5:].isdigit())


def stream_position_file(checkpoint: str, process_index: int) -> str:
    """Where a checkpoint keeps one process's `BatchStream.position()` (streaming runs)."""
    return os.path.join(checkpoint, f"stream_position_{process_index}.json")


def save_checkpoint(accelerator, output_dir: str, step: int, keep: int, stream_position: dict | None = None) -> None:
    """Save the training state to `checkpoints/step_XXXXXXXX` atomically (a killed save leaves no half
    checkpoint behind) and delete all but the newest `keep` checkpoints. `stream_position` (streaming: this
    process's `BatchStream.position()`) goes next to it as JSON."""
    folder = os.path.join(output_dir, CHECKPOINTS)
    final, partial = os.path.join(folder, f"step_{step:08d}"), os.path.join(folder, f"partial_{step:08d}")
    os.makedirs(partial, exist_ok=True)  # before any process writes its RNG state into it
    accelerator.wait_for_everyone()
    # Weights go to safetensors; accelerate always torch.saves the optimizer, scheduler and RNG states
    # (files this run wrote itself, read back only by --resume).
    accelerator.save_state(partial, safe_serialization=True)
    if stream_position is not None:
        with open(stream_position_file(partial, accelerator.process_index), "w") as handle:
            json.dump(stream_position, handle)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(partial, final)
        for old in checkpoint_steps(output_dir)[:-keep]:
            shutil.rmtree(os.path.join(folder, f"step_{old:08d}"))
    accelerator.wait_for_everyone()


# -------------------------------------------------------------------------------------------------- train
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with="tensorboard" if is_tensorboard_available() else None,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        step_scheduler_with_optimizer=False,
    )
    set_seed(args.seed)
    is_geoclip = args.model == "geoclip"

    # data
    dataset = load_geo_dataset(args.dataset, args.split, image_column=args.image_column,
                               lat_column=args.lat_column, lon_column=args.lon_column, streaming=args.streaming)
    if args.train_fraction < 1.0:
        count = max(1, round(args.train_fraction * len(dataset)))
        rows = np.random.default_rng(args.seed).choice(len(dataset), count, replace=False)
        dataset = dataset.select(np.sort(rows))
    latitudes, longitudes = training_coordinates(dataset)
    if len(latitudes) == 0:
        raise ValueError(f"No valid rows to train on in '{args.dataset}' ({args.split}).")

    # model
    tokenizer = None
    if is_geoclip:
        model, image_processor, tokenizer = build_geoclip(args.model_config)
        if args.cache_features:
            dataset = CachedFeatures(cache_clip_features(model, image_processor, dataset, args.cache_dir, accelerator))
            collate = CachedFeatures.collate
        else:
            collate = GeoCollator(image_processor)
    else:
        from .geocells import assign_geocells, build_geocells

        cells, labels = build_geocells(latitudes, longitudes, levels=parse_geocell_levels(args.geocell_levels))
        model, image_processor = build_geohier(args.model_config, cells)
        if args.streaming:  # label each row as it streams by
            dataset = dataset.map(lambda rows: {"labels": assign_geocells(cells, rows[LATITUDE],
                                                                          rows[LONGITUDE]).tolist()}, batched=True)
        else:
            dataset = dataset.add_column("labels", labels.tolist())
        collate = GeoCollator(image_processor, label_columns=["labels"] + (["scene"] if "scene" in
                                                                            (dataset.column_names or []) else []))
    dataloader = training_dataloader(dataset, collate, args, accelerator)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(args.warmup_steps, args.max_steps), args.max_steps)
    if args.streaming:  # already split across processes by `training_dataloader`
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)
    stream = BatchStream(dataloader, accelerator)

    step = 0
    if args.resume and checkpoint_steps(args.output_dir):
        step = checkpoint_steps(args.output_dir)[-1]
        checkpoint = os.path.join(args.output_dir, CHECKPOINTS, f"step_{step:08d}")
        accelerator.load_state(checkpoint)
        if args.streaming:
            with open(stream_position_file(checkpoint, accelerator.process_index)) as handle:
                stream = BatchStream(dataloader, accelerator, **json.load(handle))
        else:
            steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
            epoch, step_in_epoch = divmod(step, steps_per_epoch)
            stream = BatchStream(dataloader, accelerator, epoch, step_in_epoch * args.gradient_accumulation_steps)
        accelerator.print(f"Resumed from step {step}.")
    elif args.resume:
        accelerator.print(f"No checkpoint in {args.output_dir}: starting from step 0.")
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    hparams = {key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))}
    accelerator.init_trackers("tensorboard", config=hparams)

    # loop: one optimizer step = gradient_accumulation_steps micro-batches per process
    progress = tqdm(total=args.max_steps, initial=step, desc=f"Training {args.model}",
                    disable=not accelerator.is_local_main_process)
    samples_seen, step_losses, started = 0, [], time.perf_counter()
    log_path = os.path.join(args.output_dir, "log.jsonl")
    model.train()
    micro_batches = iter(stream)
    while step < args.max_steps:
        batch = next(micro_batches)
        with accelerator.accumulate(model):
            locations = batch.pop("locations")
            if is_geoclip:
                if args.gps_noise_km:
                    locations = add_gps_noise(locations, args.gps_noise_km)
                outputs = model(**batch, locations=locations, return_loss=True)
            else:
                outputs = model(**batch)
            accelerator.backward(outputs.loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        if is_geoclip:  # every process enqueues every process's coordinates: identical queues
            padded = accelerator.pad_across_processes(locations.to(accelerator.device), pad_index=math.nan)
            gathered = accelerator.gather(padded)
            accelerator.unwrap_model(model).enqueue_locations(gathered[torch.isfinite(gathered).all(dim=1)])
        samples_seen += len(locations)
        step_losses.append(outputs.loss.detach())
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        step += 1
        progress.update(1)
        if step % args.log_every == 0 or step == args.max_steps:
            loss = accelerator.reduce(torch.stack(step_losses).mean(), "mean").item()
            record = {"step": step, "epoch": stream.epoch, "loss": loss, "lr": scheduler.get_last_lr()[0],
                      "samples_per_second": samples_seen * accelerator.num_processes
                      / (time.perf_counter() - started)}
            accelerator.log(record, step=step)
            progress.set_postfix(loss=f"{loss:.4f}")
            if accelerator.is_main_process:
                with open(log_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
        step_losses = []
        if step % args.checkpoint_every == 0:
            save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_to_keep,
                            stream.position() if args.streaming else None)
    progress.close()

    # save: the model (+ gallery or cell table), its processor (+ tokenizer), and a summary
    counts = accelerator.gather(torch.tensor([samples_seen], device=accelerator.device)).tolist()
    skipped = accelerator.gather(torch.tensor([getattr(collate, "skipped", 0)], device=accelerator.device)).tolist()
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        if is_geoclip:
            model.set_gallery(gallery_locations(latitudes, longitudes, args.gallery_size, args.seed))
        model.save_pretrained(args.output_dir)
        image_processor.save_pretrained(args.output_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(args.output_dir)
        summary = {"model": args.model, "steps": step, "num_processes": accelerator.num_processes,
                   "samples_per_process": counts, "skipped_images_per_process": skipped,
                   "train_rows": len(latitudes), "args": vars(args)}
        with open(os.path.join(args.output_dir, "train_summary.json"), "w") as handle:
            json.dump(summary, handle, indent=2)
        if args.push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi()
            api.create_repo(args.push_to_hub, exist_ok=True)
            api.upload_folder(repo_id=args.push_to_hub, folder_path=args.output_dir,
                              ignore_patterns=[f"{CHECKPOINTS}/**", "tensorboard/**"])
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
