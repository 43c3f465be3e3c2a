"""What every `rankwatch` subcommand shares on its command line: the global options (accepted
before and after the subcommand), deprecated option aliases, and a walk over the parser tree
(used to add the global options everywhere and by the test that checks every option's help).

Conventions (docs/development.md): every option has help text; a default is written
"(default: X)"; an old option name keeps working as a :class:`DeprecatedAlias` that warns."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_LOG_LEVEL = "INFO"


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return level


def add_global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--log-level``. On a subcommand its default is SUPPRESS: a value given there overrides
    the top level's, an absent one leaves it alone."""
    if "--log-level" in parser._option_string_actions:
        return
    parser.add_argument("--log-level", type=_log_level, metavar="LEVEL",
                        default=DEFAULT_LOG_LEVEL if top else argparse.SUPPRESS,
                        help=f"log verbosity: {', '.join(LOG_LEVELS)} (default: {DEFAULT_LOG_LEVEL})")


def walk_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
                 ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(command path, parser) for the parser and every subcommand below it, each parser once
    (aliases of a subcommand share its parser)."""
    seen: set[int] = set()

    def walk(p: argparse.ArgumentParser, where: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
        if id(p) in seen:
            return
        seen.add(id(p))
        yield where, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, (*where, name))

    yield from walk(parser, path)


def subcommand_help(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    """The help line of each subcommand directly below ``parser`` (None where there is none)."""
    out: dict[str, str | None] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name in action.choices:
                out[name] = helps.get(name)
    return out


class DeprecatedAlias(argparse.Action):
    """An old option name: stores into the new option's ``dest`` and warns on stderr.

    ``parser.add_argument("--alert-state-dir", dest="state_dir", action=DeprecatedAlias,
    new="--state-dir")``. Hidden from ``--help`` unless ``help`` is given."""

    def __init__(self, option_strings: list[str], dest: str, *, new: str, help: str | None = None,  # noqa: A002
                 **kwargs: Any) -> None:
        self.new = new
        kwargs.setdefault("default", argparse.SUPPRESS)
        super().__init__(option_strings, dest, help=help if help is not None else argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        # Logging is not configured while arguments are parsed: write the warning directly.
        print(f"{parser.prog}: warning: {option_string} is deprecated and will be removed; use {self.new}",
              file=sys.stderr)
        setattr(namespace, self.dest, values)
