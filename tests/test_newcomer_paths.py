"""What a newcomer meets first: a mistyped local path fails at once with "no such folder" (never a Hub lookup
that retries), a second run on an output in use refuses with one line, workers end with their launcher, and a
rerun says how much of the work it kept."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import save_tiny_geoclip
from geoloc import cli
from geoloc.inference import runner
from geoloc.processes import output_lock
from geoloc.sources import check_local_or_hub, is_hub_id


@pytest.mark.parametrize("source, expected", [
    ("me/geoclip", True), ("geoclip", True), ("./runs/x", False), ("../x", False), ("/abs/x", False),
    ("runs/x/final", False), ("~/x", False), ("runs\\x", False), (".hidden", False), ("data/*.parquet", False),
])
def test_hub_ids_and_paths(source, expected):
    assert is_hub_id(source) is expected


def test_existing_paths_and_globs_are_local(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"")
    assert check_local_or_hub(tmp_path, "--dataset") == str(tmp_path)
    pattern = str(tmp_path / "*.parquet")
    assert check_local_or_hub(pattern, "--dataset", patterns=True) == pattern
    with pytest.raises(ValueError, match=r"--data-dir 'me/x': no such folder\.$"):
        check_local_or_hub("me/x", "--data-dir", hub=False)  # a folder option never goes to the Hub


@pytest.mark.parametrize("command", [
    ["predict", "--dataset", "./no/such/photos", "--output", "{tmp}/p.csv"],
    ["predict", "photo.jpg", "--model", "runs/no/such/model"],
    ["evaluate", "--model", "./no-such-model", "--dataset", "im2gps3k", "--output-dir", "{tmp}/e"],
    ["evaluate", "--model", "default", "--dataset", "im2gps3k", "--data-dir", "data/no-such-copy",
     "--output-dir", "{tmp}/e"],
    ["train", "--model", "geoclip", "--dataset", "/no/such/folder", "--output-dir", "{tmp}/t"],
])
def test_missing_local_paths_fail_at_once(command, tmp_path, capsys):
    command = [part.replace("{tmp}", str(tmp_path)) for part in command]
    assert cli.main(command) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"geoloc {command[0]}: error: ") and "no such folder" in error[0]


@pytest.fixture
def live_pid():
    """A process that is alive while the test runs (another run's owner)."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield sleeper.pid
    sleeper.kill()
    sleeper.wait()


def test_a_lock_is_refused_while_its_owner_lives_and_taken_over_after(tmp_path, live_pid):
    lock = tmp_path / "out" / ".geoloc.lock"
    lock.parent.mkdir()
    lock.write_text(f"{live_pid} {os.uname().nodename}\n")
    with pytest.raises(ValueError, match=rf"--output x is in use by another geoloc run \(pid {live_pid} on "):
        with output_lock(lock, "--output x"):
            pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f"{int(dead.stdout)} {os.uname().nodename}\n")  # a run that died without cleaning up
    with output_lock(lock, "--output x"):
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not lock.exists()


def test_second_runs_on_an_output_in_use_refuse(tmp_path, live_pid, capsys):
    host = os.uname().nodename
    (tmp_path / "p.csv.lock").write_text(f"{live_pid} {host}\n")
    (tmp_path / "photos").mkdir()
    assert cli.main(["predict", "--dataset", str(tmp_path / "photos"), "--output", str(tmp_path / "p.csv")]) == 1
    assert f"--output {tmp_path / 'p.csv'} is in use by another geoloc run (pid {live_pid}" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".geoloc.lock").write_text(f"{live_pid} {host}\n")
    assert cli.main(["train", "--model", "geoclip", "--dataset", str(tmp_path / "photos"), "--output-dir",
                     str(tmp_path / "run")]) == 1
    assert f"--output-dir {tmp_path / 'run'} is in use by another geoloc run" in capsys.readouterr().err


def _running(pid: int) -> bool:
    """Alive and not a zombie (a reparented child may wait a while to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
def test_workers_end_with_their_launcher():
    worker = ("import time; from geoloc.processes import exit_with_launcher; "
              "assert exit_with_launcher(poll_s=0.1); time.sleep(60)")
    launcher = ("import os, subprocess, sys, time; "
                f"child = subprocess.Popen([sys.executable, '-c', {worker!r}], "
                "env={**os.environ, 'LOCAL_RANK': '0'}); "
                "print(child.pid, flush=True); time.sleep(1)")  # then dies without waiting for its worker
    pid = int(subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, check=True).stdout)
    deadline = time.monotonic() + 30
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(pid), "the worker outlived its launcher"


def test_a_rerun_says_how_much_it_kept(tmp_path, monkeypatch, capsys):
    save_tiny_geoclip(tmp_path / "model", np.random.default_rng(0).uniform([-90, -180], [90, 180], size=(10, 2)))
    (tmp_path / "photos").mkdir()
    for index in range(3):
        Image.fromarray(np.full((16, 16, 3), 60 * index, dtype=np.uint8)).save(tmp_path / "photos" / f"{index}.png")
    command = ["predict", "--dataset", str(tmp_path / "photos"), "--output", str(tmp_path / "p.csv"), "--model",
               str(tmp_path / "model"), "--chunk-size", "2"]
    write = runner.ChunkParts.write

    def crash_after_the_first_chunk(self, chunk, frame):
        write(self, chunk, frame)
        raise KeyboardInterrupt  # as if the job were stopped here

    monkeypatch.setattr(runner.ChunkParts, "write", crash_after_the_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        cli.main(command)
    assert not (tmp_path / "p.csv.lock").exists()  # released, even by a stopped run
    monkeypatch.setattr(runner.ChunkParts, "write", write)
    capsys.readouterr()
    assert cli.main(command) == 0
    assert f"Resumed: 2 of 3 rows already predicted (in {tmp_path / 'p.csv.parts'})." in capsys.readouterr().err
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + 3 * 5
