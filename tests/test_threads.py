"""Torch thread picking: the precedence of an explicit request, DataLoader workers, OMP_NUM_THREADS and the
cores left by other work; the `--threads` option; the `geoloc` dispatcher applying it."""

import argparse
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from geoloc.cli import main
from geoloc import threads
from geoloc.threads import add_threads_argument, busy_threads, pick_threads, set_threads


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(cores=8, load=0.0, environ={}), 8),                                  # quiet machine: every core
    (dict(cores=8, processes=2, load=0.0, environ={}), 4),                      # two ranks share the cores
    (dict(cores=8, load=0.0, environ={"LOCAL_WORLD_SIZE": "4"}), 2),            # accelerate launch / torchrun
    (dict(cores=2, load=1.2, environ={}), 1),                                  # one other busy job on 2 cores
    (dict(cores=2, load=7.0, environ={}), 1),                                  # never fewer than one
    (dict(cores=16, load=5.6, environ={}), 10),
    (dict(cores=2, load=0.0, environ={"OMP_NUM_THREADS": "3"}), 3),             # the user's word
    (dict(requested=2, cores=16, load=9.0, environ={"OMP_NUM_THREADS": "1"}), 2),  # --threads beats all
])
def test_pick_threads_precedence(kwargs, expected):
    assert pick_threads(**kwargs) == expected


@pytest.mark.parametrize("kwargs, message", [
    (dict(requested=0), "threads must be a positive integer, got 0"),
    (dict(requested="2.5"), "threads must be a positive integer, got '2.5'"),
    (dict(environ={"OMP_NUM_THREADS": "four"}), "OMP_NUM_THREADS must be a positive integer, got 'four'"),
    (dict(environ={"LOCAL_WORLD_SIZE": "0"}), "LOCAL_WORLD_SIZE must be a positive integer, got '0'"),
    (dict(processes=-1, environ={}), "processes must be a positive integer, got -1"),
])
def test_bad_thread_settings_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pick_threads(**kwargs)


class _ThreadsSeen(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return torch.tensor([pick_threads(environ={"OMP_NUM_THREADS": "2"}), torch.get_num_threads()])


def test_data_workers_get_one_thread(restore_threads):
    """PyTorch's worker loop gives each data worker one thread; the pick agrees there, whatever the environment."""
    torch.set_num_threads(2)
    loader = DataLoader(_ThreadsSeen(), batch_size=None, num_workers=1)
    assert [row.tolist() for row in loader] == [[1, 1], [1, 1]]
    assert pick_threads(environ={"OMP_NUM_THREADS": "2"}) == 2  # the main process is no worker


def test_threads_option_shows_its_default_and_rejects_bad_values(capsys, restore_threads, monkeypatch):
    monkeypatch.setattr(threads, "busy_threads", lambda: 0.0)  # the same machine state for both picks below
    parser = argparse.ArgumentParser()
    add_threads_argument(parser)
    assert f"{pick_threads()} now on this machine" in " ".join(parser.format_help().split())
    assert parser.parse_args([]).threads is None and parser.parse_args(["--threads", "3"]).threads == 3
    assert set_threads(parser.parse_args(["--threads", "1"]).threads) == 1 == torch.get_num_threads()
    with pytest.raises(SystemExit):
        parser.parse_args(["--threads", "0"])
    assert "--threads must be a positive integer, got '0'" in capsys.readouterr().err


def test_dispatcher_sets_threads_before_the_command(capsys, restore_threads, monkeypatch):
    torch.set_num_threads(2)
    # the command parses its options (and fails, exit 1) after the dispatcher set the threads
    assert main(["--threads", "1", "worldmap", "--no-such-option"]) == 1
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    assert main(["worldmap", "--no-such-option"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "geoloc worldmap: error: OMP_NUM_THREADS must be a positive integer, got 'many'.")


def test_busy_threads_sees_other_processes_at_once():
    """Two busy loops started a moment ago count as two busy threads (no minute of load-average lag)."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.5)
        assert busy_threads() >= 2
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
