"""The Prometheus rule files in ``alerts/``, read once for everything derived from them: the
PrometheusRule manifest, the Amazon Managed Prometheus rule groups namespace and the Grafana
alert rules. ``alerts/*.yml`` stays the single source; these readers never change what they read."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rankwatch.errors import InputError


@dataclass(frozen=True)
class AlertRule:
    """One alerting rule, as written in its file."""

    name: str
    expr: str
    for_: str  # Prometheus duration as written, "" when the rule has none
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    group: str = ""
    interval: str = ""  # the group's evaluation interval, "" for the server's default
    keep_firing_for: str = ""
    source: str = ""  # "file:group#index", for error messages


def read_yaml(path: Path) -> Any:
    """``path`` parsed as YAML; unreadable or invalid YAML is an :class:`InputError` naming the
    file (and the line)."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InputError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None


def load_groups(files: Iterable[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """Every rule group of ``files``, with the file it came from, in file order.

    A file that is not YAML or has no ``groups`` list is an error naming the file (and the line
    for YAML errors); so is a group name used twice, which Prometheus and AMP both refuse."""
    out: list[tuple[Path, dict[str, Any]]] = []
    seen: dict[str, Path] = {}
    for path in files:
        doc = read_yaml(path)
        if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list):
            raise InputError(f"{path}: not a Prometheus rule file (no top-level `groups` list)")
        for i, group in enumerate(doc["groups"]):
            if not isinstance(group, dict) or not group.get("name") or not isinstance(group.get("rules"), list):
                raise InputError(f"{path}: groups[{i}] needs a `name` and a `rules` list")
            if group["name"] in seen:
                raise InputError(f"{path}: rule group {group['name']!r} is also defined in {seen[group['name']]}")
            seen[group["name"]] = Path(path)
            out.append((Path(path), group))
    return out


def alert_rules(files: Iterable[Path]) -> list[AlertRule]:
    """The alerting rules (not the recording rules) of ``files``, in file and group order."""
    out = []
    for path, group in load_groups(files):
        for i, rule in enumerate(group["rules"]):
            if not isinstance(rule, dict) or "alert" not in rule:
                continue
            where = f"{path.name}:{group['name']}#{i}"
            if not isinstance(rule.get("expr"), str) or not rule["expr"].strip():
                raise InputError(f"{path}: rule {rule.get('alert')!r} in group {group['name']!r} has no `expr`")
            out.append(AlertRule(
                name=str(rule["alert"]), expr=rule["expr"], for_=str(rule.get("for") or ""),
                labels={str(k): str(v) for k, v in (rule.get("labels") or {}).items()},
                annotations={str(k): str(v) for k, v in (rule.get("annotations") or {}).items()},
                group=str(group["name"]), interval=str(group.get("interval") or ""), source=where,
                keep_firing_for=str(rule.get("keep_firing_for") or "")))
    return out


_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def duration_seconds(text: str) -> float:
    """A Prometheus duration ("90s", "1h30m", "5d") in seconds; "" is 0."""
    text = text.strip()
    if not text:
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += int(m[1]) * _UNIT_S[m[2]]
        pos = m.end()
    if pos != len(text) or pos == 0:
        raise InputError(f"{text!r} is not a Prometheus duration (like 30s, 5m, 1h30m, 5d)")
    return total


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, templates) as `|` blocks, so payloads read like the source;
    no anchors/aliases, so each object reads on its own."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _str_representer)


def dump_yaml(doc: Any) -> str:
    """YAML in document order with literal blocks for multi-line strings."""
    return yaml.dump(doc, Dumper=_LiteralDumper, sort_keys=False, width=120, allow_unicode=True)
