"""`rankwatch …` entry point.

Each subcommand lives with the code it runs: a module listed in SUBCOMMAND_MODULES exposes
``register(subparsers)`` which adds its parser and sets ``func``. Modules import their heavy
dependencies inside ``func`` so that `rankwatch node-exporter` does not pay for grafanalib.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from rankwatch import __version__
from rankwatch.cliargs import add_global_options, walk_parsers
from rankwatch.errors import RankwatchError

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "rankwatch.exporters.node",
    "rankwatch.detectors.cli",
    "rankwatch.alerts.cli",
    "rankwatch.dashboards.cli",
    "rankwatch.deploy.cli",
    "rankwatch.sim.cli",
    "rankwatch.gpucheck.cli",
    "rankwatch.demo",
    "rankwatch.assets",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankwatch", description="Observability and straggler detection for large GPU training jobs.")
    parser.add_argument("--version", action="version", version=f"rankwatch {__version__}",
                        help="print the version and exit")
    add_global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # subcommand not built in this checkout
                continue
            raise
        module.register(sub)
    # Global options after the subcommand too (`rankwatch detector … --log-level DEBUG`), on
    # every parser the modules registered, nested ones included.
    for _path, p in walk_parsers(parser):
        if p is not parser:
            add_global_options(p, top=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from rankwatch.secrets import RedactingFilter

    for handler in logging.getLogger().handlers:  # no loaded secret reaches stderr, whoever logs it
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except RankwatchError as exc:
        print(f"rankwatch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
