"""The `rankwatch` command: subcommands are discoverable and user errors never show a traceback."""

from __future__ import annotations

import subprocess
import sys

from rankwatch.cli import main


def test_help_lists_commands(capsys) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "usage: rankwatch" in out


def test_version_flag() -> None:
    res = subprocess.run([sys.executable, "-m", "rankwatch", "--version"], capture_output=True, text=True)
    assert res.returncode == 0
    assert res.stdout.startswith("rankwatch ")
