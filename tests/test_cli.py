"""The `geoloc` dispatcher: help, every subcommand's --help, and errors as messages, not tracebacks."""

import pytest

from geoloc.cli import SUBCOMMANDS, main


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0 and "predict" in capsys.readouterr().out
    assert main(["bogus"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("geoloc: error: argument command: invalid choice: 'bogus'") and "usage" not in line


def test_bad_input_is_a_message_with_exit_status_1(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["geocells", "build", "--dataset", str(missing), "--output", str(tmp_path / "cells.json")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("geoloc geocells: error:") and "Traceback" not in error


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_help_shows_the_defaults(command):
    """Each option with a default (not None, off or empty) says it in --help, with its help text."""
    import argparse
    import importlib

    parsers = [importlib.import_module(SUBCOMMANDS[command][0]).build_parser()]
    for parser in parsers:  # subcommands of a subcommand too (geocells build|import)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
    for parser in parsers:
        help_text = " ".join(parser.format_help().split())
        for action in parser._actions:
            default = action.default
            if not action.option_strings or default is None or default is False or default in ([], argparse.SUPPRESS):
                continue
            assert action.help, f"{parser.prog} {action.option_strings[0]} has no help text"
            shown = " ".join(parser._get_formatter()._expand_help(action).split())
            assert "(default" in shown and shown in help_text, f"{parser.prog} {action.option_strings[0]}: {shown}"
