"""Alerting configuration: the [slack], [wandb], [alertmanager], [notify] and [links] tables of the
detector's TOML file, validated into frozen dataclasses.

Secrets never live in the TOML file: the Slack webhook URL and bot token are read from the
environment (``SLACK_WEBHOOK_URL``, ``SLACK_BOT_TOKEN`` by default), from a file whose path the
config names, or from the file named by ``<VARIABLE>_FILE`` (Docker secrets), always through
``rankwatch.secrets`` (one printable line, registered for redaction). They are kept out of ``repr`` so a logged config never shows them."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from rankwatch.errors import ConfigError
from rankwatch.secrets import SecretError, read_secret_file, secret_from_env

SEVERITIES = ("info", "warning", "critical")
KINDS = ("straggler", "gpu_fault", "network", "hang", "throughput_drop", "data_gap")


@dataclass(frozen=True)
class SlackConfig:
    # Exactly one transport: a bot token + channel ID (chat.postMessage, chat.update, threads,
    # chart uploads) or an incoming webhook (one channel fixed by Slack, no edits, no files).
    webhook_url: str | None = field(default=None, repr=False)
    bot_token: str | None = field(default=None, repr=False)
    channel: str | None = None  # channel ID (C0123…), required with a bot token
    api_url: str = "https://slack.com/api/"  # WebClient base_url; tests point it at rankwatch.sim.slack
    timeout_s: float = 10.0
    max_retries: int = 3  # per request, for 429 (honouring Retry-After) and 500/503
    chart: bool = True  # attach a PNG of the culprit's compute time (bot token only)
    chart_window_s: float = 3600.0

    @property
    def mode(self) -> str:
        return "bot" if self.bot_token else "webhook"


@dataclass(frozen=True)
class WandbConfig:
    project: str
    entity: str | None = None
    group: str | None = None  # W&B group of the training run; default: the event's run label
    mode: str = "online"  # "online" | "offline" (tests; `wandb sync` uploads later)
    log_scores: bool = True
    wait_duration_s: float = 60.0  # W&B's own per-title alert throttle (it turns 0 into 60)


@dataclass(frozen=True)
class AlertmanagerConfig:
    url: str
    timeout_s: float = 5.0
    # Firing alerts are re-posted this often (Prometheus does the same): Alertmanager resolves
    # an alert by itself when its endsAt passes, so a dead detector does not leave it firing.
    resend_interval_s: float = 60.0
    generator_url: str | None = None


@dataclass(frozen=True)
class NotifyConfig:
    # Firing episodes of one run that start within this many seconds (data time) of the first
    # one share one incident: one Slack message, one W&B alert.
    group_window_s: float = 300.0
    # Wall-clock delay before an incident's first message, so episodes decided in the next
    # cycles join it (Alertmanager's group_wait).
    group_wait_s: float = 30.0
    max_per_minute: int = 20  # per target; excess waits in the outbox, nothing is dropped
    min_interval_s: float = 1.0  # Slack allows about one message per second per channel
    renotify_interval_s: float = 14400.0  # remind about incidents still firing; 0 = never
    retry_interval_s: float = 15.0  # background delivery / retry loop period
    retry_max_backoff_s: float = 600.0
    min_severity: str = "warning"
    kinds: tuple[str, ...] = KINDS
    close_timeout_s: float = 10.0  # how long close() keeps delivering before leaving the rest queued


@dataclass(frozen=True)
class LinksConfig:
    # str.format templates. Fields: {run} {rank} {node} {gpu} {nic} {kind} {episode}
    # {from_ms} {to_ms} (one hour before the episode to now, for Grafana's time range).
    grafana_url: str | None = None
    wandb_run_url: str | None = None
    runbook_url: str | None = None  # e.g. https://github.com/org/repo/blob/main/docs/runbooks/{alert}.md
    prometheus_url: str | None = None  # for the chart's range query


@dataclass(frozen=True)
class AlertingConfig:
    slack: SlackConfig | None
    wandb: WandbConfig | None
    alertmanager: AlertmanagerConfig | None
    notify: NotifyConfig
    links: LinksConfig

    @property
    def any_target(self) -> bool:
        return bool(self.slack or self.wandb or self.alertmanager)


# ---------------------------------------------------------------------------------------------

_SLACK_KEYS = {"enabled", "webhook_url_env", "webhook_url_file", "bot_token_env", "bot_token_file", "channel",
               "api_url", "timeout_s", "max_retries", "chart", "chart_window_s"}
_SECRET_KEYS = {"webhook_url", "bot_token", "token"}


def _table(doc: Mapping[str, Any], name: str, source: str) -> dict[str, Any] | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: [{name}] must be a table")
    return dict(value)


def _check_keys(table: Mapping[str, Any], allowed: set[str], name: str, source: str) -> None:
    for key in table:
        if key not in allowed:
            hint = ""
            if key in _SECRET_KEYS:
                hint = " (secrets are read from the environment or a file: use *_env or *_file)"
            raise ConfigError(f"{source}: {name}.{key}: unknown key{hint}; allowed: {', '.join(sorted(allowed))}")


# Longest duration any [notify]/[slack]/[alertmanager] setting may have: beyond this a value is a
# typo (1e308 overflowed the delivery thread's wait), not a policy.
MAX_SECONDS = 30 * 86400.0


def _num(table: Mapping[str, Any], key: str, default: float, name: str, source: str, *,
         minimum: float = 0.0, maximum: float = MAX_SECONDS, integer: bool = False, allow_zero: bool = True) -> Any:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{source}: {name}.{key}: must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{source}: {name}.{key}: must be a finite number, got {value!r}")
    if value < minimum or (not allow_zero and value == 0):
        raise ConfigError(f"{source}: {name}.{key}: must be {'>' if not allow_zero else '>='} {minimum}, got {value!r}")
    if value > maximum:
        raise ConfigError(f"{source}: {name}.{key}: must be at most {maximum:g}, got {value!r}")
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{source}: {name}.{key}: must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def _str(table: Mapping[str, Any], key: str, default: str | None, name: str, source: str) -> str | None:
    value = table.get(key, default)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(f"{source}: {name}.{key}: must be a non-empty string, got {value!r}")
    return value


def _bool(table: Mapping[str, Any], key: str, default: bool, name: str, source: str) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: {name}.{key}: must be true or false, got {value!r}")
    return value


def _secret(table: Mapping[str, Any], env_key: str, file_key: str, default_env: str, name: str, source: str,
            environ: Mapping[str, str]) -> str | None:
    """The secret from the file named by ``file_key``, else the environment variable (``env_key``,
    default ``default_env``), else the file named by that variable + ``_FILE`` (the Docker
    secrets convention; an empty file there means "not configured", like an empty variable)."""
    path = _str(table, file_key, None, name, source)
    env_name = str(_str(table, env_key, default_env, name, source))
    try:
        if path is not None:
            return read_secret_file(path, what=f"{name}.{file_key}")
        value = secret_from_env(env_name, environ, what=f"{name}.{env_key}")
        if value:
            return value
        file_env = environ.get(env_name + "_FILE", "").strip()
        if file_env:
            return read_secret_file(file_env, what=f"{env_name}_FILE", allow_empty=True) or None
    except SecretError as exc:
        raise SecretError(f"{source}: {exc}") from None
    return None


def _slack(doc: Mapping[str, Any], source: str, environ: Mapping[str, str]) -> SlackConfig | None:
    t = _table(doc, "slack", source)
    explicit = t is not None
    t = t or {}
    _check_keys(t, _SLACK_KEYS, "slack", source)
    # Validate every value even when Slack ends up off, so a typo shows at the first start.
    enabled = _bool(t, "enabled", True, "slack", source)
    channel = _str(t, "channel", None, "slack", source)
    if channel is not None and not re.fullmatch(r"#?[\w.-]{1,80}", channel):
        raise ConfigError(f"{source}: slack.channel: expected a channel ID such as C0123ABCD, got {channel!r}")
    api_url = _str(t, "api_url", "https://slack.com/api/", "slack", source) or ""
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", api_url):
        raise ConfigError(f"{source}: slack.api_url: expected an http(s) URL such as https://slack.com/api/, "
                          f"got {api_url!r}")
    if not api_url.endswith("/"):
        api_url += "/"
    values = dict(
        channel=channel,
        api_url=api_url,
        timeout_s=_num(t, "timeout_s", 10.0, "slack", source, allow_zero=False),
        max_retries=_num(t, "max_retries", 3, "slack", source, integer=True, maximum=20),
        chart=_bool(t, "chart", True, "slack", source),
        chart_window_s=_num(t, "chart_window_s", 3600.0, "slack", source, allow_zero=False),
    )
    webhook = _secret(t, "webhook_url_env", "webhook_url_file", "SLACK_WEBHOOK_URL", "slack", source, environ)
    token = _secret(t, "bot_token_env", "bot_token_file", "SLACK_BOT_TOKEN", "slack", source, environ)
    if not enabled:
        return None
    if not webhook and not token:
        if explicit and "enabled" in t:
            raise ConfigError(f"{source}: slack.enabled is true but no webhook URL or bot token was found "
                              "(set SLACK_WEBHOOK_URL or SLACK_BOT_TOKEN, or slack.webhook_url_file / slack.bot_token_file)")
        return None
    if token and not channel:
        raise ConfigError(f"{source}: slack.channel: required with a bot token (a channel ID such as C0123ABCD)")
    if webhook and not token and not webhook.startswith(("https://", "http://")):
        raise ConfigError(f"{source}: slack webhook URL must start with https:// (value not shown)")
    return SlackConfig(webhook_url=None if token else webhook, bot_token=token, **values)


def _wandb(doc: Mapping[str, Any], source: str) -> WandbConfig | None:
    t = _table(doc, "wandb", source)
    if t is None:
        return None
    _check_keys(t, {"enabled", "project", "entity", "group", "mode", "log_scores", "wait_duration_s"}, "wandb", source)
    if not _bool(t, "enabled", True, "wandb", source):
        return None
    project = _str(t, "project", None, "wandb", source)
    if project is None:
        raise ConfigError(f"{source}: wandb.project: required (the training run's W&B project)")
    mode = _str(t, "mode", "online", "wandb", source)
    if mode not in ("online", "offline"):
        raise ConfigError(f"{source}: wandb.mode: must be \"online\" or \"offline\", got {mode!r}")
    return WandbConfig(
        project=project,
        entity=_str(t, "entity", None, "wandb", source),
        group=_str(t, "group", None, "wandb", source),
        mode=str(mode),
        log_scores=_bool(t, "log_scores", True, "wandb", source),
        wait_duration_s=_num(t, "wait_duration_s", 60.0, "wandb", source, allow_zero=False),
    )


def _alertmanager(doc: Mapping[str, Any], source: str) -> AlertmanagerConfig | None:
    t = _table(doc, "alertmanager", source)
    if t is None:
        return None
    _check_keys(t, {"enabled", "url", "timeout_s", "resend_interval_s", "generator_url"}, "alertmanager", source)
    if not _bool(t, "enabled", True, "alertmanager", source):
        return None
    url = _str(t, "url", None, "alertmanager", source)
    if url is None or not url.startswith(("http://", "https://")):
        raise ConfigError(f"{source}: alertmanager.url: required, an http(s) URL such as http://alertmanager:9093, got {url!r}")
    return AlertmanagerConfig(
        url=url.rstrip("/"),
        timeout_s=_num(t, "timeout_s", 5.0, "alertmanager", source, allow_zero=False),
        resend_interval_s=_num(t, "resend_interval_s", 60.0, "alertmanager", source, allow_zero=False),
        generator_url=_str(t, "generator_url", None, "alertmanager", source),
    )


def _notify(doc: Mapping[str, Any], source: str) -> NotifyConfig:
    t = _table(doc, "notify", source) or {}
    allowed = {f.name for f in fields(NotifyConfig)}
    _check_keys(t, allowed, "notify", source)
    d = NotifyConfig()
    sev = _str(t, "min_severity", d.min_severity, "notify", source)
    if sev not in SEVERITIES:
        raise ConfigError(f"{source}: notify.min_severity: must be one of {', '.join(SEVERITIES)}, got {sev!r}")
    kinds = t.get("kinds", list(d.kinds))
    if not isinstance(kinds, list) or not all(isinstance(k, str) and k for k in kinds):
        raise ConfigError(f"{source}: notify.kinds: must be a list of event kinds, got {kinds!r}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        # A typo here would silence that kind of alert for good.
        raise ConfigError(f"{source}: notify.kinds: unknown kind {unknown[0]!r}; known: {', '.join(KINDS)}")
    return NotifyConfig(
        group_window_s=_num(t, "group_window_s", d.group_window_s, "notify", source),
        group_wait_s=_num(t, "group_wait_s", d.group_wait_s, "notify", source),
        max_per_minute=_num(t, "max_per_minute", d.max_per_minute, "notify", source, integer=True, allow_zero=False,
                            maximum=10_000),
        min_interval_s=_num(t, "min_interval_s", d.min_interval_s, "notify", source),
        renotify_interval_s=_num(t, "renotify_interval_s", d.renotify_interval_s, "notify", source),
        retry_interval_s=_num(t, "retry_interval_s", d.retry_interval_s, "notify", source, allow_zero=False),
        retry_max_backoff_s=_num(t, "retry_max_backoff_s", d.retry_max_backoff_s, "notify", source, allow_zero=False),
        min_severity=str(sev),
        kinds=tuple(kinds),
        close_timeout_s=_num(t, "close_timeout_s", d.close_timeout_s, "notify", source),
    )


def _links(doc: Mapping[str, Any], source: str) -> LinksConfig:
    t = _table(doc, "links", source) or {}
    _check_keys(t, {f.name for f in fields(LinksConfig)}, "links", source)
    values = {k: _str(t, k, None, "links", source) for k in ("grafana_url", "wandb_run_url", "runbook_url", "prometheus_url")}
    from rankwatch.alerts.links import check_template  # avoid an import cycle

    for key in ("grafana_url", "wandb_run_url", "runbook_url"):
        if values[key]:
            check_template(values[key], f"{source}: links.{key}")
    return LinksConfig(**values)


def load_alerting_config(doc: Mapping[str, Any], *, source: str = "<config>",
                         environ: Mapping[str, str] | None = None) -> AlertingConfig:
    """Validate the alerting tables of a parsed TOML document. Raises ConfigError naming the key."""
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{source}: expected a table of settings")
    env = os.environ if environ is None else environ
    return AlertingConfig(
        slack=_slack(doc, source, env),
        wandb=_wandb(doc, source),
        alertmanager=_alertmanager(doc, source),
        notify=_notify(doc, source),
        links=_links(doc, source),
    )
