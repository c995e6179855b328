"""`geoloc`: the package's one console script. Each subcommand lives in its own module with
`build_parser()` and `main(argv)`; this file dispatches to them and turns every failure into one line on
stderr, `geoloc COMMAND: error: ...`, with exit status 1 (`geoloc --debug COMMAND ...` shows the traceback).

Commands that talk to the Hugging Face Hub (`HUB_COMMANDS`) first check in about a second that it can be
reached; when it cannot, they run offline (as with `HF_HUB_OFFLINE=1`: cached files only, Hub calls fail at
once) instead of retrying for half a minute, and a failure says so. When stderr is not a terminal, the
progress bars of transformers and huggingface_hub are off."""

import argparse
import importlib
import os
import socket
import sys
import urllib.parse
import urllib.request
from unittest import mock

from .allocator import keep_freed_memory
from .threads import add_threads_argument, set_threads


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The formatter of every `geoloc` parser: each option's help ends with its default, unless it has none
    (None, off, empty) or its help already says it."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is False or default == [] or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# Commands that run a model over many images: their large activations reuse freed memory (`geoloc.allocator`).
INFERENCE_COMMANDS = ("predict", "evaluate", "calibrate")
SUBCOMMANDS = {
    "predict": ("geoloc.inference.predict", "geolocate images or text with a GeoCLIP or GeoHier checkpoint"),
    "train": ("geoloc.training.train", "train GeoCLIP or GeoHier (also: accelerate launch -m geoloc.training.train)"),
    "evaluate": ("geoloc.inference.evaluate", "evaluate a checkpoint on a benchmark (metrics.json + predictions.csv)"),
    "calibrate": ("geoloc.inference.calibration", "fit calibrated confidence and unfamiliar-input statistics on held-out images"),
    "convert": ("geoloc.hub.convert", "convert an official GeoCLIP release (wheel or Hub folder) into a checkpoint"),
    "publish": ("geoloc.hub.publish", "push a checkpoint, its model card and results to the Hugging Face Hub"),
    "geocells": ("geoloc.geography.geocells", "build S2 geocell hierarchies from training coordinates"),
    "worldmap": ("geoloc.data.worldmap", "build the world-map crops dataset used by the CPU learnability benchmark"),
    "space": ("geoloc.hub.space", "assemble the Gradio Space (app + package sources) in a folder ready to upload"),
}
HUB_COMMANDS = ("convert", "publish")
HUB_PROBE_TIMEOUT_S = 3.0


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub endpoint cannot be reached (a TCP connection, at most `HUB_PROBE_TIMEOUT_S`),
    or None when it can, when offline mode is already on, or when a proxy is configured (not probed)."""
    from huggingface_hub import constants

    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    if constants.HF_HUB_OFFLINE or urllib.request.getproxies().get(endpoint.scheme):
        return None
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as error:
        return f"{constants.ENDPOINT} is unreachable ({error or type(error).__name__})"
    return None


def go_offline() -> None:
    """Offline mode for this process and its children, as `HF_HUB_OFFLINE=1` would have set it at start."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub and transformers


def quiet_progress_bars() -> None:
    """Turn off the progress bars of transformers (loading weights) and huggingface_hub (downloads)."""
    import huggingface_hub
    from transformers.utils import logging

    logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


MAX_MESSAGE_CHARS = 500  # a longer message (e.g. an unpickler's dump of the bytes) is cut there


def check_minimums(parser: argparse.ArgumentParser, args: argparse.Namespace, **minimums: int) -> None:
    """`parser.error` (exit 2) for the first option below its minimum, e.g. `batch_size=1`; None (not given)
    passes."""
    for name, minimum in minimums.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


class UsageError(ValueError):
    """A bad command line, as argparse found it: reported like every other failure (one line, exit 1)."""


def _raise_usage_error(parser: argparse.ArgumentParser, message: str):
    raise UsageError(f"{message} (see `{parser.prog} --help`)")


def one_line(error: BaseException) -> str:
    """The message of `error` on one line, without Python's type names; unexpected kinds (not ValueError,
    OSError, ImportError) point at `--debug` for the traceback."""
    text = " ".join(str(error).split())
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[:MAX_MESSAGE_CHARS] + "..."
    if isinstance(error, MemoryError):
        return f"out of memory{': ' + text if text else ''} (run `geoloc --debug ...` for the traceback)"
    if isinstance(error, (ValueError, OSError, ImportError)) and text:
        return text
    return f"{text or 'unexpected failure'} (run `geoloc --debug ...` for the traceback)"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="geoloc",
        description="Worldwide image geolocation with GeoCLIP and GeoHier.",
        epilog="Run `geoloc COMMAND --help` for the options of each command.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    add_threads_argument(parser)
    parser.add_argument("command", choices=sorted(SUBCOMMANDS), help="; ".join(
        f"{name}: {text}" for name, (_, text) in sorted(SUBCOMMANDS.items())))
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    if not argv:
        parser.print_help()
        return 2
    if argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    # argparse's errors (usage block, exit 2) become one line and exit 1, here and in every subcommand's parser
    with mock.patch.object(argparse.ArgumentParser, "error", _raise_usage_error):
        try:
            # Options before the command are the dispatcher's (`geoloc --threads 1 train ...`); the rest the command's.
            namespace = parser.parse_args(argv)
        except UsageError as error:
            print(f"geoloc: error: {one_line(error)}", file=sys.stderr)
            return 1
        return _run(namespace)


def _run(namespace: argparse.Namespace) -> int:
    command = namespace.command
    if not sys.stderr.isatty():  # logs and pipes get messages, not progress bars redrawn with carriage returns
        quiet_progress_bars()
    offline = hub_unreachable() if command in HUB_COMMANDS else None
    if offline:
        go_offline()
    try:
        if command == "train":  # picks threads that do not depend on the load, and records them
            if namespace.threads is not None:
                namespace.args = ["--threads", str(namespace.threads), *namespace.args]
        elif not {"-h", "--help"} & set(namespace.args):  # help answers at once, without importing torch
            set_threads(namespace.threads)
            if command in INFERENCE_COMMANDS:
                keep_freed_memory()
        return importlib.import_module(SUBCOMMANDS[command][0]).main(namespace.args) or 0
    except Exception as error:  # KeyboardInterrupt and SystemExit (--help's exit 0) pass through
        if namespace.debug:
            raise
        message = one_line(error)
        if offline:
            message += f" [{offline}: ran offline, as with HF_HUB_OFFLINE=1; use local folders or cached files]"
        print(f"geoloc {command}: error: {message}", file=sys.stderr)
        return 1


def run_command(command: str) -> None:
    """`python -m geoloc.COMMAND ARGS` behaves as `geoloc COMMAND ARGS` (same error handling)."""
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
