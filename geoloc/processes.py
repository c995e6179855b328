"""Long runs that write one output: one run at a time per output, and no worker left behind by its launcher.

- `output_lock(path, what)`: a lock file holding the owner's pid and host. A second run on the same output
  refuses with one line while the first is alive; a lock left by a dead run (same host, pid gone) is taken over.
- `exit_with_launcher()`: under `accelerate launch` / `torchrun` (LOCAL_RANK set), a daemon thread ends this
  worker within a second of its launcher's death (`kill -9` of the launcher would otherwise leave the workers
  running, writing into an output that a rerun then uses too). Plain runs are left alone: `nohup geoloc train`
  must survive its shell.

Example:
    >>> with output_lock("runs/x/.geoloc.lock", "--output-dir runs/x"):  # doctest: +SKIP
    ...     train()
"""

import contextlib
import os
import socket
import sys
import threading
import time


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _owner(path: str) -> tuple[int, str] | None:
    """(pid, host) recorded in a lock file, or None when it cannot be read (being written, or garbage)."""
    try:
        with open(path) as handle:
            pid, host = handle.read().split(maxsplit=1)
        return int(pid), host.strip()
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def output_lock(path, what: str):
    """Hold `path` (created with this process's pid and host) while the block runs; remove it afterwards.

    Raises:
        ValueError: while another live process holds it: `"{what} is in use by another geoloc run (pid N on
            HOST, lock PATH): ..."`.
    """
    path, me = os.fspath(path), (os.getpid(), socket.gethostname())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for _ in range(2):  # a stale lock is removed once, then created again exclusively
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(path)
            if owner is not None and owner != me and (owner[1] != me[1] or _alive(owner[0])):
                raise ValueError(f"{what} is in use by another geoloc run (pid {owner[0]} on {owner[1]}, lock {path}): "
                                 "wait for it to end or stop it; delete the lock only if that run is gone.") from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # left by a run that died
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(f"{me[0]} {me[1]}\n")
        break
    try:
        yield
    finally:
        if _owner(path) == me:
            os.remove(path)


def exit_with_launcher(poll_s: float = 1.0) -> bool:
    """Under a launcher (LOCAL_RANK set), end this process (exit status 1) when its parent, the launcher, dies.
    Returns whether the watch was started."""
    if "LOCAL_RANK" not in os.environ:
        return False
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        print(f"geoloc: error: the launcher (pid {launcher}) is gone: this worker (pid {os.getpid()}) stops.",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="geoloc-launcher-watch", daemon=True).start()
    return True


__all__ = ["exit_with_launcher", "output_lock"]
