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
    with pytest.raises(SystemExit) as exit_info:
        main(["bogus"])
    assert exit_info.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


def test_bad_input_is_a_message_with_exit_status_1(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["geocells", "build", "--dataset", str(missing), "--output", str(tmp_path / "cells.json")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("geoloc geocells: error:") and "Traceback" not in error
