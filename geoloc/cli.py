"""`geoloc`: the package's one console script. Each subcommand lives in its own module with
`build_parser()` and `main(argv)`; this file only dispatches to them."""

import argparse
import importlib
import sys

from .threads import add_threads_argument, set_threads


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The formatter of every `geoloc` parser: each option's help ends with its default, unless it has none
    (None, off, empty) or its help already says it."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is False or default == [] or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


SUBCOMMANDS = {
    "predict": ("geoloc.predict", "geolocate images or text with a GeoCLIP or GeoHier checkpoint"),
    "train": ("geoloc.train", "train GeoCLIP or GeoHier (also: accelerate launch -m geoloc.train)"),
    "evaluate": ("geoloc.evaluate", "evaluate a checkpoint on a benchmark (metrics.json + predictions.csv)"),
    "convert": ("geoloc.convert", "convert an official GeoCLIP release (wheel or Hub folder) into a checkpoint"),
    "publish": ("geoloc.publish", "push a checkpoint, its model card and results to the Hugging Face Hub"),
    "geocells": ("geoloc.geocells", "build S2 geocell hierarchies from training coordinates"),
    "worldmap": ("geoloc.worldmap", "build the world-map crops dataset used by the CPU learnability benchmark"),
    "space": ("geoloc.space", "assemble the Gradio Space (app + package sources) in a folder ready to upload"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="geoloc",
        description="Worldwide image geolocation with GeoCLIP and GeoHier.",
        epilog="Run `geoloc COMMAND --help` for the options of each command.",
    )
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
    # Options before the command are the dispatcher's (`geoloc --threads 1 train ...`); the rest is the command's.
    namespace = parser.parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[namespace.command][0])
    try:
        set_threads(namespace.threads)
        return module.main(namespace.args) or 0
    except (ValueError, OSError) as error:  # bad input, model or data: a message, not a traceback
        print(f"geoloc {namespace.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
