"""The two payloads Amazon Managed Service for Prometheus (AMP) takes, built from ``alerts/``:

- a *rule groups namespace*: the groups of ``alerts/rankwatch-*.yml`` in one Prometheus rule file;
- an *alert manager definition*: ``template_files`` plus ``alertmanager_config`` (a string),
  made from ``alerts/alertmanager.yml`` with every receiver turned into an Amazon SNS receiver,
  the only kind AMP delivers to. The route tree (grouping, critical/warning routing, timings)
  and the inhibit rules are kept as written.

:func:`amp_refusals` lists what AMP would refuse, so that a bad config fails here, with the
field named, before any AWS call. Pure functions: no I/O beyond reading the given files.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rankwatch.errors import InputError
from rankwatch.rulefiles import dump_yaml, duration_seconds, load_groups, read_yaml

# AMP caps repeat_interval at 5 days (its Alertmanager's limit).
MAX_REPEAT_INTERVAL_S = 5 * 86400
TEMPLATE_FILE = "rankwatch.tmpl"
MESSAGE_FORMATS = ("chatbot", "text")
SNS_ARN = re.compile(r"^arn:aws[a-z-]*:sns:(?P<region>[a-z0-9-]*):(?P<account>\d{12}):(?P<name>[A-Za-z0-9_-]{1,256}(\.fifo)?)$")
# Keys AMP refuses anywhere in alertmanager_config: it makes the calls itself (SigV4 to SNS) and
# has no file system to read *_file fields from.
FORBIDDEN_KEYS = ("api_url", "http_config")

# Alertmanager templates for the SNS message. "chatbot" is the JSON event that AWS Chatbot
# (Amazon Q Developer in chat applications) renders in Slack; it ignores any other message.
# rankwatch.json.str writes a value as the inside of a JSON string: Go's %q quoting matches
# JSON's for printable text; the outer quotes are dropped because the template writes its own.
TEMPLATES = r'''{{ define "rankwatch.json.str" }}{{ reReplaceAll "^\"|\"$" "" (printf "%q" .) }}{{ end }}

{{ define "rankwatch.sns.title" }}{{ if eq .Status "resolved" }}:white_check_mark: Resolved{{ else if eq .CommonLabels.severity "critical" }}:red_circle:{{ else }}:large_orange_circle:{{ end }} {{ .CommonLabels.alertname }}{{ with .CommonLabels.run }} · run {{ . }}{{ end }}{{ with .CommonLabels.Hostname }} · {{ . }}{{ end }}{{ end }}

{{ define "rankwatch.sns.text" }}{{ template "rankwatch.sns.title" . }}
{{ range .Alerts }}
{{ .Annotations.summary }}
{{ .Annotations.description }}
Runbook: {{ .Annotations.runbook_url }}
{{ end }}{{ end }}

{{ define "rankwatch.sns.chatbot" }}{"version":"1.0","source":"custom","content":{"textType":"client-markdown","title":"{{ if eq .Status "resolved" }}:white_check_mark: Resolved{{ else if eq .CommonLabels.severity "critical" }}:red_circle:{{ else }}:large_orange_circle:{{ end }} {{ template "rankwatch.json.str" .CommonLabels.alertname }}{{ with .CommonLabels.run }} · run {{ template "rankwatch.json.str" . }}{{ end }}{{ with .CommonLabels.Hostname }} · {{ template "rankwatch.json.str" . }}{{ end }}","description":"{{ range .Alerts }}*{{ template "rankwatch.json.str" .Annotations.summary }}*\n{{ template "rankwatch.json.str" .Annotations.description }}\nRunbook: {{ template "rankwatch.json.str" .Annotations.runbook_url }}\n{{ end }}"},"metadata":{"threadId":"{{ template "rankwatch.json.str" (printf "%s/%s" .Receiver (.GroupLabels.SortedPairs.Values | join ",")) }}","summary":"{{ template "rankwatch.json.str" .CommonLabels.alertname }} {{ .Status }}"}}{{ end }}
'''


def rule_groups_namespace(files: Iterable[Path]) -> str:
    """The rule groups namespace data: every group of ``files`` in one rule file, verbatim."""
    groups = [group for _, group in load_groups(files)]
    if not groups:
        raise InputError("no rule groups to upload")
    return dump_yaml({"groups": groups})


def _topic_region(arn: str, what: str) -> str:
    m = SNS_ARN.match(arn)
    if not m:
        raise InputError(f"{what}: {arn!r} is not an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)")
    if not m["region"]:
        raise InputError(f"{what}: {arn!r} names no region; AMP's SNS receivers need one for SigV4")
    return m["region"]


def _sns_receiver(name: str, topic_arn: str, message_format: str, send_resolved: bool) -> dict[str, Any]:
    return {
        "name": name,
        "sns_configs": [{
            "topic_arn": topic_arn,
            "sigv4": {"region": _topic_region(topic_arn, f"receiver {name!r}")},
            "message": '{{ template "rankwatch.sns.' + message_format + '" . }}',
            # Static (AMP's Alertmanager does not template attributes): an SNS subscription
            # filter policy on `receiver` picks e.g. only the on-call copy of a critical alert.
            "attributes": {"receiver": name, "source": "rankwatch"},
            "send_resolved": send_resolved,
        }],
    }


def alertmanager_config(source: Mapping[str, Any], default_topic: str, *,
                        receiver_topics: Mapping[str, str] | None = None,
                        message_format: str = "chatbot") -> dict[str, Any]:
    """``source`` (an Alertmanager config) with every receiver that has no ``sns_configs``
    replaced by one SNS receiver of the same name, publishing to ``receiver_topics[name]`` or
    ``default_topic``. Routes, inhibit rules and timings are kept."""
    if message_format not in MESSAGE_FORMATS:
        raise InputError(f"message format {message_format!r}: use one of {', '.join(MESSAGE_FORMATS)}")
    topics = dict(receiver_topics or {})
    cfg = copy.deepcopy(dict(source))
    names = [r.get("name") for r in cfg.get("receivers") or []]
    unknown = sorted(set(topics) - set(names))
    if unknown:
        raise InputError(f"--receiver-topic names receivers that the config does not have: {', '.join(unknown)} "
                         f"(receivers: {', '.join(map(str, names))})")
    receivers = []
    for receiver in cfg.get("receivers") or []:
        if receiver.get("sns_configs"):
            receivers.append(receiver)  # already SNS: kept, and checked by amp_refusals
            continue
        integrations = [v for k, v in receiver.items() if k.endswith("_configs") and isinstance(v, list)]
        if not integrations:
            receivers.append(receiver)  # a null receiver (drops alerts on purpose) stays one
            continue
        send_resolved = all(c.get("send_resolved", True) for configs in integrations for c in configs)
        receivers.append(_sns_receiver(receiver["name"], topics.get(receiver["name"], default_topic),
                                       message_format, send_resolved))
    cfg["receivers"] = receivers
    cfg["templates"] = [TEMPLATE_FILE]
    glob = cfg.get("global") or {}
    # Global settings of the integrations that were replaced (Slack URL, SMTP...) mean nothing now.
    cfg["global"] = {k: v for k, v in glob.items() if k == "resolve_timeout"}
    if not cfg["global"]:
        cfg.pop("global")
    return cfg


def _walk(node: Any, path: str) -> Iterable[tuple[str, str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, str(k), v
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def _routes(route: Mapping[str, Any], path: str = "route") -> Iterable[tuple[str, Mapping[str, Any]]]:
    yield path, route
    for i, child in enumerate(route.get("routes") or []):
        yield from _routes(child, f"{path}.routes[{i}]")


def amp_refusals(cfg: Mapping[str, Any]) -> list[str]:
    """What AMP would refuse in ``cfg`` (an alertmanager_config), one line per problem."""
    problems: list[str] = []
    for path, key, _ in _walk(cfg, ""):
        where = f"{path}.{key}" if path else key
        if key in FORBIDDEN_KEYS:
            problems.append(f"{where}: AMP does not allow `{key}` (it calls SNS itself, with SigV4)")
        elif key.endswith("_file"):
            problems.append(f"{where}: AMP cannot read local files; put the value in AWS (e.g. the SNS topic)")
    for i, receiver in enumerate(cfg.get("receivers") or []):
        name = receiver.get("name", f"#{i}")
        for key in receiver:
            if key.endswith("_configs") and key != "sns_configs":
                problems.append(f"receivers[{i}] ({name}): {key}: AMP delivers only to Amazon SNS (sns_configs)")
        for j, sns in enumerate(receiver.get("sns_configs") or []):
            where = f"receivers[{i}] ({name}).sns_configs[{j}]"
            if not (sns.get("sigv4") or {}).get("region"):
                problems.append(f"{where}: sigv4.region is missing; AMP signs its SNS calls and needs the region")
            if not sns.get("topic_arn"):
                problems.append(f"{where}: topic_arn is missing")
    route = cfg.get("route")
    if not isinstance(route, dict):
        problems.append("route: missing")
    else:
        for path, r in _routes(route):
            if "repeat_interval" in r:
                try:
                    seconds = duration_seconds(str(r["repeat_interval"]))
                except InputError as exc:
                    problems.append(f"{path}.repeat_interval: {exc}")
                    continue
                if seconds > MAX_REPEAT_INTERVAL_S:
                    problems.append(f"{path}.repeat_interval: {r['repeat_interval']} is over AMP's limit of 5d")
    templates = set(cfg.get("templates") or [])
    if templates - {TEMPLATE_FILE}:
        problems.append(f"templates: {sorted(templates - {TEMPLATE_FILE})}: AMP only has the definition's "
                        f"template_files ({TEMPLATE_FILE})")
    return problems


def alertmanager_definition(source_path: Path, default_topic: str, *,
                            receiver_topics: Mapping[str, str] | None = None,
                            message_format: str = "chatbot") -> str:
    """The alert manager definition data for AMP, or an :class:`InputError` listing every
    problem AMP would refuse (file and field named)."""
    source = read_yaml(source_path)
    if not isinstance(source, dict) or not source.get("receivers"):
        raise InputError(f"{source_path}: not an Alertmanager config (no receivers)")
    cfg = alertmanager_config(source, default_topic, receiver_topics=receiver_topics,
                              message_format=message_format)
    problems = amp_refusals(cfg)
    if problems:
        raise InputError(f"{source_path}: AMP would refuse this alert manager definition:\n  "
                         + "\n  ".join(problems))
    return dump_yaml({"template_files": {TEMPLATE_FILE: TEMPLATES}, "alertmanager_config": dump_yaml(cfg)})
