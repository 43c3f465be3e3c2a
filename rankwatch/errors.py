"""User-facing errors: the CLI prints their message (which names the file, line or field) and
exits non-zero, never a traceback."""

from __future__ import annotations


class RankwatchError(Exception):
    """An error the user can fix: bad configuration, bad input file, unreachable service."""


class ConfigError(RankwatchError):
    """A configuration value or file is invalid. The message names the key or file and line."""


class InputError(RankwatchError):
    """An input file (replay data, fixture) is malformed. The message names file, line and field."""
