"""Torch intra-op threads that do not fight over the CPU cores.

PyTorch starts one intra-op thread per core in every process. When several processes share the cores (data
workers, `accelerate launch` ranks, other jobs on the machine), every parallel op waits at its barrier for a
thread that the kernel has descheduled: on a loaded 2-core machine a tiny model trained at 1.9 it/s with the
default threads and at 17 it/s with one. `pick_threads` chooses a count that leaves the cores to whoever else
needs them; `set_threads` applies it; `add_threads_argument` adds the `--threads` option to a parser. The
`geoloc` dispatcher applies it before every inference command (`geoloc --threads N COMMAND ...`); DataLoader
workers keep the one thread PyTorch gives them. Training does not look at the load (`training_threads`): the
same command and seed must give the same weights on a quiet and on a busy machine.

Example:
    >>> parser = argparse.ArgumentParser()
    >>> add_threads_argument(parser)
    >>> set_threads(parser.parse_args(["--threads", "1"]).threads)
    1
"""

import argparse
import os
import statistics
import sys
import time


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else `os.cpu_count()`)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _positive_int(value, name: str) -> int:
    """`value` as an int >= 1, or a ValueError naming `name`."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or str(number) != str(value).strip():
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return number


def _in_data_worker() -> bool:
    """Whether this is a DataLoader worker process (never, if torch is not even imported: `--help` stays fast)."""
    if "torch" not in sys.modules:
        return False
    from torch.utils.data import get_worker_info

    return get_worker_info() is not None


def busy_threads(samples: int = 5, interval: float = 0.005) -> float:
    """Threads of other processes that are runnable now: the median of `samples` reads, `interval` seconds
    apart, of the kernel's count of runnable threads (`/proc/loadavg`, Linux), less the reading thread itself.
    Where there is no such count, the 1-minute load average (0 where there is none either)."""
    try:
        counts = []
        for sample in range(samples):
            if sample:
                time.sleep(interval)
            with open("/proc/loadavg") as file:
                counts.append(int(file.read().split()[3].split("/")[0]) - 1)
        return float(statistics.median(counts))
    except (OSError, IndexError, ValueError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def pick_threads(
    requested: int | None = None,
    *,
    processes: int | None = None,
    cores: int | None = None,
    load: float | None = None,
    environ=None,
) -> int:
    """Torch intra-op threads for this process, by the first rule that applies:

    1. `requested` (an explicit `--threads`), when given;
    2. 1 inside a DataLoader worker process (the main process computes; workers decode);
    3. `OMP_NUM_THREADS`, when set (the user's word for every OpenMP program);
    4. the cores not busy with other work, shared among this job's processes on this machine:
       `(cores - round(load)) // processes`, at least 1. `load` is `busy_threads()`, read at start: the
       threads of other processes runnable right now (not the 1-minute load average, which lags: a job
       started right after another would count that one too and leave cores idle).

    Args:
        requested (`int`, *optional*): an explicit thread count (>= 1).
        processes (`int`, *optional*): processes of this job sharing the cores; default `LOCAL_WORLD_SIZE`
            (set by `accelerate launch` / `torchrun`), else 1.
        cores (`int`, *optional*): default `available_cores()`. load (`float`, *optional*): default
            `busy_threads()`. environ (*optional*): default `os.environ`.

    Raises:
        ValueError: `requested`, `processes`, `OMP_NUM_THREADS` or `LOCAL_WORLD_SIZE` that is not a positive
            integer.

    Example:
        >>> pick_threads(cores=8, processes=2, load=0.0, environ={})
        4
        >>> pick_threads(cores=2, load=3.9, environ={})  # two other busy jobs on a 2-core machine
        1
    """
    environ = os.environ if environ is None else environ
    if requested is not None:
        return _positive_int(requested, "threads")
    if _in_data_worker():
        return 1
    if environ.get("OMP_NUM_THREADS"):
        return _positive_int(environ["OMP_NUM_THREADS"], "OMP_NUM_THREADS")
    if processes is None:
        processes = _positive_int(environ.get("LOCAL_WORLD_SIZE", 1), "LOCAL_WORLD_SIZE")
    processes = _positive_int(processes, "processes")
    cores = available_cores() if cores is None else cores
    if load is None:
        load = busy_threads()
    return max(1, (cores - round(load)) // processes)


def training_threads(requested: int | None = None, *, processes: int | None = None, cores: int | None = None,
                     environ=None) -> int:
    """Torch intra-op threads for a training process: `pick_threads` without the machine's load, so the count
    (and with it the order of every parallel sum, hence the weights) is the same whether the machine is quiet
    or busy: `requested`, else `OMP_NUM_THREADS`, else the cores divided among this job's processes
    (`LOCAL_WORLD_SIZE`), at least 1. `geoloc train` records it and `--resume` reuses it.

    Example:
        >>> training_threads(cores=8, processes=2, environ={})
        4
    """
    return pick_threads(requested, processes=processes, cores=cores, load=0.0, environ=environ)


def set_threads(requested: int | None = None, **kwargs) -> int:
    """Set torch's intra-op threads to `pick_threads(requested, **kwargs)` and return the count."""
    import torch  # here, not at the top: `geoloc --help` does not wait for torch

    threads = pick_threads(requested, **kwargs)
    torch.set_num_threads(threads)
    return threads


def add_threads_argument(parser: argparse.ArgumentParser) -> argparse.Action:
    """Add `--threads N` (default `None`: `pick_threads()` at run time, whose value here shows in --help).

    Apply it with `set_threads(args.threads)` before the work starts.
    """

    def threads(value: str) -> int:
        try:
            return _positive_int(value, "--threads")
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    try:
        now = f"{pick_threads()} now on this machine"
    except ValueError as error:  # a bad OMP_NUM_THREADS is reported when the threads are set, not by --help
        now = str(error)
    return parser.add_argument(
        "--threads", type=threads, default=None, metavar="N",
        help=f"torch intra-op threads (default: picked at start, {now}: OMP_NUM_THREADS if set, else the "
        "cores not busy with other work divided among this job's processes)",
    )


__all__ = ["add_threads_argument", "available_cores", "busy_threads", "pick_threads", "set_threads",
           "training_threads"]
