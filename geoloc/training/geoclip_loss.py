"""GeoCLIP's contrastive objective, outside the model as open_clip's `ClipLoss`: the GPS queue of negatives,
the gather of the global batch across processes and the GPS noise, step for step as the official loop
(`geoclip/train/train.py` of geoclip 1.3.0).

One optimizer step of `geoloc.training.train` with it (the `GeoCLIPTask` calls these):

    batches = loss.gather_step(micro_batches, weights)  # the global batch's locations, noised once
    for batch, weight in zip(batches, weights):
        loss(model, batch, weight).backward()
    optimizer.step()
    loss.update_queue(model)  # the global batch enters the GPS queue

Each image is scored against the locations of the whole global batch (every process, every accumulated
micro-batch) and the GPS queue as it was before the step, so 1 process, N processes and gradient accumulation
train the same weights from the same batches. The queue itself is model state (`GeoCLIPModel.gps_queue`, saved
in checkpoints, as in the official model); this module decides what enters it and when.
"""

import torch

from geo_core import destination_points


class GeoCLIPLoss:
    """GeoCLIP's loss for `geoloc.training.train`'s loop (see the module docstring).

    Args:
        accelerator: the run's `accelerate.Accelerator` (process count, gather, unwrapping).
        gps_noise_km (`float`): the paper's GPS augmentation: the batch's coordinates are moved by 2-D Gaussian
            noise of this standard deviation per axis (0.15 km in the paper).
        queue_noise_km (`float`): the same for the locations as they enter the queue (1 km in the paper).
    """

    def __init__(self, accelerator, gps_noise_km: float = 0.0, queue_noise_km: float = 0.0):
        self.accelerator, self.gps_noise_km, self.queue_noise_km = accelerator, gps_noise_km, queue_noise_km
        self.step_locations = self.queue_entries = None

    def gather_step(self, batches: list[dict], weights: list[float]) -> list[dict]:
        """Gather the step's locations from every process and micro-batch, ordered (micro-batch, process) as one
        process reading the global batch would have them, noised once; mark each image's own row among them
        (`positive_rows`). A stand-in batch (weight 0) contributes no rows."""
        device, noised, queued, start = self.accelerator.device, [], [], 0
        for batch, weight in zip(batches, weights):
            locations, real = batch["locations"].to(device), weight > 0
            everyone, offset = gather_rows(add_gps_noise(locations, self.gps_noise_km), self.accelerator, real)
            batch["positive_rows"] = torch.arange(start + offset, start + offset + len(locations), device=device)
            start += len(everyone)
            noised.append(everyone)
            queued.append(gather_rows(add_gps_noise(locations, self.queue_noise_km), self.accelerator, real)[0])
        self.step_locations, self.queue_entries = torch.cat(noised), torch.cat(queued)
        return batches

    def __call__(self, model, batch: dict, weight: float = 1.0) -> torch.Tensor:
        """The loss of one micro-batch of the step, times `weight` (0 for a stand-in batch, which is scored
        against its own locations only)."""
        inputs = {key: batch[key] for key in ("pixel_values", "clip_image_embeds") if key in batch}
        if weight == 0:
            return model(**inputs, locations=batch["locations"], return_loss=True).loss * weight
        unwrapped = self.accelerator.unwrap_model(model)
        queue = unwrapped.gps_queue[: int(unwrapped.gps_queue_count)].to(self.step_locations)
        # The queue is encoded in the same pass, after the batch's locations, as in the official loop
        # (`torch.cat([gps, gps_queue])`): the same operations give the same gradients.
        locations = torch.cat([self.step_locations, queue])
        return model(**inputs, locations=locations, labels=batch["positive_rows"], return_loss=True).loss * weight

    def update_queue(self, model) -> None:
        """After the optimizer step: the step's locations (with their queue noise) enter the GPS queue. Every
        process enqueues the same global batch in the same order, so the queues stay identical."""
        self.accelerator.unwrap_model(model).enqueue_locations(self.queue_entries)


def gather_rows(rows: torch.Tensor, accelerator, real: bool = True) -> tuple[torch.Tensor, int]:
    """All processes' `(n_p, 2)` rows concatenated in process order, and where this process's rows start.

    `real=False` contributes no rows (a stand-in batch) but still takes part in the collective calls.
    """
    if accelerator.num_processes == 1:
        return (rows, 0) if real else (rows[:0], 0)
    mine = rows if real else rows[:0]
    counts = accelerator.gather(torch.tensor([len(mine)], device=rows.device)).tolist()
    padded = accelerator.pad_across_processes(mine, dim=0)
    gathered = accelerator.gather(padded).view(accelerator.num_processes, -1, rows.shape[-1])
    everyone = torch.cat([gathered[process, :count] for process, count in enumerate(counts)])
    return everyone, sum(counts[: accelerator.process_index])


def add_gps_noise(locations: torch.Tensor, sd_km: float) -> torch.Tensor:
    """GeoCLIP's GPS augmentation: each (lat, lon) of `locations` (B, 2) moved by 2-D Gaussian noise of standard
    deviation `sd_km` along each axis (north, east), i.e. a uniform bearing and a Rayleigh distance, on the sphere
    (`destination_points`). `sd_km == 0` returns `locations` unchanged."""
    if not sd_km:
        return locations
    north, east = torch.randn(2, len(locations), dtype=torch.float64, device=locations.device) * sd_km
    moved = destination_points(locations, torch.atan2(east, north), torch.hypot(north, east))
    return moved.to(locations.dtype)
