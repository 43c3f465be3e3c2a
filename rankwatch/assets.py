"""Where rankwatch's declarative artifacts live: alert rules, runbooks, dashboards, example config.

In a checkout they are the top-level directories (``alerts/``, ``docs/runbooks/``,
``dashboards/``, ``examples/``), kept there as monitoring mixins do so that promtool, Grafana and
docker compose read them directly. A wheel carries a copy under ``rankwatch/_assets/`` (made by
``setup.py``'s build step), read through ``importlib.resources``. Callers get a real directory
either way and never guess a path relative to the current working directory.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from rankwatch.errors import InputError

# name -> path inside a checkout (relative to the repository root) and inside the wheel's _assets/
ASSETS: dict[str, str] = {
    "alerts": "alerts",
    "runbooks": "docs/runbooks",
    "dashboards": "dashboards",
    "examples": "examples",
}

_CHECKOUT = Path(__file__).resolve().parents[1]


def asset_dir(name: str) -> Path:
    """The directory holding asset ``name`` (one of :data:`ASSETS`)."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    packaged = resources.files("rankwatch") / "_assets" / ASSETS[name]
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = _CHECKOUT / ASSETS[name]
    # A checkout is recognised by its pyproject.toml, so that an unrelated ``alerts/`` beside an
    # installed package in site-packages is never taken for ours.
    if (_CHECKOUT / "pyproject.toml").is_file() and checkout.is_dir():
        return checkout
    raise InputError(f"rankwatch's {name} files are missing: neither {packaged} nor {checkout} exists "
                     "(reinstall rankwatch from its wheel or run from a checkout)")


def rule_files() -> list[Path]:
    """The Prometheus rule files (``alerts/rankwatch-*.yml``), never empty."""
    files = sorted(asset_dir("alerts").glob("rankwatch-*.yml"))
    if not files:
        raise InputError(f"no rule files (rankwatch-*.yml) in {asset_dir('alerts')}")
    return files


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "assets", help="print where the alert rules, runbooks, dashboards and examples are",
        description="Print the directory of rankwatch's declarative artifacts (from the checkout, or the "
                    "copy inside the installed package), e.g. "
                    "`cp \"$(rankwatch assets examples)/detector.toml\" .` or "
                    "`promtool check rules \"$(rankwatch assets alerts)\"/rankwatch-*.yml`.")
    p.add_argument("name", nargs="?", choices=sorted(ASSETS),
                   help="one artifact directory to print (default: every one, as `name<TAB>path`)")
    p.set_defaults(func=_print)


def _print(args: argparse.Namespace) -> int:
    if args.name:
        print(asset_dir(args.name))
    else:
        for name in ASSETS:
            print(f"{name}\t{asset_dir(name)}")
    return 0
