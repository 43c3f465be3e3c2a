"""One consistent command line: every option of every subcommand (walked from the real argparse
tree, so options added later are covered too) has help text and writes its default one way,
"(default: X)"; global options work after the subcommand; `--help` works everywhere."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from rankwatch.cli import build_parser, main
from rankwatch.cliargs import subcommand_help, walk_parsers

PARSER = build_parser()
PARSERS = list(walk_parsers(PARSER))
IDS = [" ".join(path) or "rankwatch" for path, _ in PARSERS]


def _expanded_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser._get_formatter()._expand_help(action) if action.help else ""


def _trivial_default(action: argparse.Action) -> bool:
    """Defaults that need no mention: none, an empty list, or the off state of a flag."""
    d = action.default
    if d is None or d is argparse.SUPPRESS or d == []:
        return True
    if isinstance(action, argparse._StoreFalseAction):  # (a subclass of _StoreConstAction)
        return d is True
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreConstAction | argparse._CountAction):
        return d in (False, 0)
    return False


def option_problems(parser: argparse.ArgumentParser) -> list[str]:
    problems = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        if action.help is argparse.SUPPRESS:
            continue  # hidden on purpose (deprecated aliases, internal knobs)
        text = _expanded_help(parser, action)
        if not text.strip():
            problems.append(f"{name}: no help text")
            continue
        for inner in re.findall(r"\(([^()]*)\)", text):
            if re.search(r"\bdefault\b", inner, re.I) and not inner.startswith("default: "):
                problems.append(f"{name}: default written as ({inner}), not (default: …)")
            if not _trivial_default(action) and inner.strip() in {str(action.default), f"{action.default:g}"
                                                                  if isinstance(action.default, float) else ""}:
                problems.append(f"{name}: default written as ({inner}), not (default: …)")
        if re.search(r"\bdefault [^:(]", text) and "(default" not in text and not _trivial_default(action):
            problems.append(f"{name}: default not written as (default: …)")
        if not _trivial_default(action) and "(default: " not in text:
            problems.append(f"{name}: has default {action.default!r} but its help does not say (default: …)")
    for sub, help_text in subcommand_help(parser).items():
        if not help_text:
            problems.append(f"subcommand {sub}: no help text")
    return problems


def test_the_walk_reaches_every_subcommand() -> None:
    # the walk is what the other checks rely on: it must see the nested subcommands
    paths = {" ".join(p) for p, _ in PARSERS}
    assert {"detector", "detect", "node-exporter", "alerts preview", "alerts outbox", "dashboards push",
            "sim scenario", "sim slack", "demo"} <= paths


@pytest.mark.parametrize(("path", "parser"), PARSERS, ids=IDS)
def test_every_option_has_help_and_writes_its_default_one_way(path: tuple[str, ...],
                                                               parser: argparse.ArgumentParser) -> None:
    assert option_problems(parser) == []


def test_the_checker_catches_what_it_is_meant_to() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--a", type=int, default=1)
    p.add_argument("--b", type=int, default=5, help="how many (5)")
    p.add_argument("--c", type=int, default=5, help="how many (default 5)")
    p.add_argument("--d", type=int, default=5, help="how many")
    p.add_argument("--e", type=int, default=5, help="how many (default: 5)")
    p.add_argument("--f", action="store_true", help="a flag")
    found = "\n".join(option_problems(p))
    assert "--a: no help text" in found
    assert "--b: default written as (5)" in found
    assert "--c: default written as (default 5)" in found
    assert "--d: has default 5" in found
    assert "--e" not in found and "--f" not in found


@pytest.mark.parametrize("path", [p for p, _ in PARSERS], ids=IDS)
def test_help_exits_0_and_ends_with_a_newline(path: tuple[str, ...], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rankwatch") and out.endswith("\n")


LEAVES = [p for p, parser in PARSERS
          if p and not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)]


@pytest.mark.parametrize("path", LEAVES, ids=[" ".join(p) for p in LEAVES])
def test_log_level_is_accepted_after_every_subcommand(path: tuple[str, ...], capsys) -> None:
    args = PARSER.parse_args([*path, "--log-level", "debug", *_required(path)])
    assert args.log_level == "DEBUG"
    assert PARSER.parse_args(["--log-level", "ERROR", *path, *_required(path)]).log_level == "ERROR"
    assert PARSER.parse_args([*path, *_required(path)]).log_level == "INFO"


def _required(path: tuple[str, ...]) -> list[str]:
    """Arguments the subcommand requires, so that parsing succeeds."""
    return {
        ("detect",): ["--replay", "x.om"],
        ("alerts", "send-test"): ["--config", "c.toml"],
        ("alerts", "flush"): ["--config", "c.toml", "--state-dir", "s"],
        ("alerts", "outbox"): ["--state-dir", "s"],
        ("dashboards", "push"): ["--grafana", "http://g"],
        ("sim", "scenario"): ["healthy"],
    }.get(path, [])


def test_log_level_after_the_subcommand_takes_effect(subprocess_env) -> None:
    """A real run: the simulated exporter logs INFO lines, then fails on a port in use; with
    --log-level ERROR after the subcommand only the error is left."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        base = [sys.executable, "-m", "rankwatch", "node-exporter", "--simulate", "--simulate-efa", "1",
                "--web.listen-address", f"127.0.0.1:{busy.getsockname()[1]}"]
        default = subprocess.run(base, capture_output=True, text=True, env=subprocess_env, timeout=120)
        quiet = subprocess.run([*base, "--log-level", "error"], capture_output=True, text=True, env=subprocess_env,
                               timeout=120)
    assert default.returncode == quiet.returncode == 2
    assert " INFO " in default.stderr and "cannot listen on" in default.stderr
    assert " INFO " not in quiet.stderr and "cannot listen on" in quiet.stderr


def test_deprecated_names_still_work_and_warn(capsys) -> None:
    args = PARSER.parse_args(["detector", "--state-db", "/tmp/x/detector.sqlite"])
    assert args.state_db == "/tmp/x/detector.sqlite"
    assert "--state-db is deprecated" in capsys.readouterr().err
    args = PARSER.parse_args(["detect", "--replay", "x.om", "--alert-state-dir", "/tmp/s"])
    assert args.state_dir == "/tmp/s"
    assert "use --state-dir" in capsys.readouterr().err
    args = PARSER.parse_args(["dashboards", "push", "--grafana", "http://g", "--prometheus", "http://p:9090"])
    assert args.run_from_prometheus == "http://p:9090"
    assert "use --run-from-prometheus" in capsys.readouterr().err
    # the new names, without a warning
    args = PARSER.parse_args(["dashboards", "push", "--grafana", "http://g", "--run-from-prometheus", "http://p"])
    assert args.run_from_prometheus == "http://p" and capsys.readouterr().err == ""
