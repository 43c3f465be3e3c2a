"""Property-based tests (hypothesis) for what the alerting side reads from outside: label values
on their way into Slack messages, the TOML values of the alerting tables, and secret files."""

from __future__ import annotations

import html
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rankwatch.alerts import AlertSink, _make_targets, load_alerting_config
from rankwatch.alerts.config import MAX_SECONDS, LinksConfig
from rankwatch.alerts.lifecycle import EpisodeView, IncidentView
from rankwatch.alerts.render import escape_mrkdwn, render_incident, render_plain, render_thread_reply
from rankwatch.errors import ConfigError
from rankwatch.events import Event
from rankwatch.secrets import SecretError, read_secret_file

# Text a label may hold: anything, with Slack's and mrkdwn's special characters made likely.
MARKUP = st.sampled_from(["<", ">", "&", "|", "!", "<!channel>", "<!here>", "<@U123>", "<#C1>", "&amp;", "&lt;",
                          "<https://evil.example|click>", "*", "_", "~", "`", "```", "$", "\\", "\n", ":x:", "\u202e"])
LABEL = st.lists(st.one_of(MARKUP, st.text(max_size=8)), max_size=12).map("".join)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ENTITY_OR_TEXT = re.compile(r"&(?!(amp|lt|gt);)")


def _event(run: str, node: str, gpu: str, nic: str, summary: str, evidence: dict[str, Any], rank: int | None,
           state: str = "firing") -> Event:
    return Event(time=1.79e9, kind="straggler", state=state, run=run, rank=rank, node=node or None, gpu=gpu or None,
                 score=5.0, summary=summary, evidence=evidence, episode=f"{run}/{rank}", nic=nic or None,
                 since=1.79e9 - 60)


EVIDENCE = st.dictionaries(st.sampled_from(["explanation", "cause", "peer_group", "slowdown", "xid", "odd key <>"]),
                           st.one_of(LABEL, st.lists(LABEL, max_size=3), st.floats(allow_nan=False), st.integers()),
                           max_size=4)


@st.composite
def incidents(draw: st.DrawFn) -> IncidentView:
    run = draw(LABEL)
    episodes = []
    for i in range(draw(st.integers(1, 4))):
        ev = _event(run, draw(LABEL), draw(LABEL), draw(LABEL), draw(LABEL), draw(EVIDENCE),
                    draw(st.one_of(st.none(), st.integers(0, 4095))))
        episodes.append(EpisodeView(episode=f"e{i}", state="firing", firing=ev))
    return IncidentView(id=draw(st.integers(1, 10**6)), run=run or None, state="firing", opened_at=1.79e9,
                        resolved_at=1.79e9 + 600, reminders=draw(st.integers(0, 5)), episodes=episodes)


def _mrkdwn(blocks: list[dict[str, Any]]) -> list[str]:
    out = []
    for b in blocks:
        for obj in [b.get("text")] + (b.get("fields") or []) + (b.get("elements") or []):
            if isinstance(obj, dict) and obj.get("type") == "mrkdwn":
                out.append(obj["text"])
    return out


def _inert(text: str) -> None:
    # No control sequence but rankwatch's own date formatting, and every "&" starts an entity.
    assert all(chunk.startswith("!date^") for chunk in text.split("<")[1:]), text
    assert ">" not in re.sub(r"<!date\^[^>]*>", "", text), text
    assert not ENTITY_OR_TEXT.search(text), text


@SETTINGS
@given(view=incidents(), action=st.sampled_from(["firing", "update", "resolved", "reminder"]))
def test_labels_never_become_slack_markup_and_messages_fit_slack(view: IncidentView, action: str) -> None:
    links = LinksConfig(grafana_url="https://g.example/d/x?var-node={node}&var-run={run}")
    msg = render_incident(view, action, links, now=1.79e9 + 60)
    for text in [msg.text, render_thread_reply(view, action)] + _mrkdwn(msg.blocks):
        _inert(text)
    # Slack's Block Kit limits (the local Slack server refuses what Slack refuses).
    header = msg.blocks[0]["text"]
    assert header["type"] == "plain_text" and 0 < len(header["text"]) <= 150
    for b in msg.blocks:
        if b["type"] == "section":
            assert len((b.get("text") or {}).get("text", "")) <= 3000 and len(b.get("fields") or []) <= 10
            assert all(len(f["text"]) <= 2000 for f in b.get("fields") or [])
        if b["type"] == "actions":
            assert all(btn["url"].startswith("https://g.example/") and " " not in btn["url"] for btn in b["elements"])
    assert len(msg.text) <= 3000
    # What the reader sees is the label as it was typed.
    run_field = msg.blocks[2]["fields"][0]["text"]
    if view.run and len(run_field) < 2000:
        assert html.unescape(run_field.split("\n", 1)[1]) == view.run
    render_plain(view, action, links)  # and the plain text renders too


@SETTINGS
@given(label=LABEL)
def test_escaping_round_trips(label: str) -> None:
    escaped = escape_mrkdwn(label)
    assert "<" not in escaped and ">" not in escaped
    assert html.unescape(escaped) == label or "&" in label  # html.unescape also decodes entities typed by users
    assert escaped.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") == label


# -- TOML values of the alerting tables ----------------------------------------------------------

TOML_SCALAR = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=30),
                        st.datetimes(), st.sampled_from(["", " ", "0", "1e308", "nan", "https://x", "C0123ABC",
                                                         "/", "/dev/null", "a\x00b", "straggler", "offline"]))
TOML_VALUE = st.recursive(TOML_SCALAR, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=6), inner, max_size=2), max_leaves=6)
KEYS = {
    "slack": ["enabled", "webhook_url_env", "webhook_url_file", "bot_token_env", "bot_token_file", "channel",
              "api_url", "timeout_s", "max_retries", "chart", "chart_window_s", "token"],
    "wandb": ["enabled", "project", "entity", "group", "mode", "log_scores", "wait_duration_s"],
    "alertmanager": ["enabled", "url", "timeout_s", "resend_interval_s", "generator_url"],
    "notify": ["group_window_s", "group_wait_s", "max_per_minute", "min_interval_s", "renotify_interval_s",
               "retry_interval_s", "retry_max_backoff_s", "min_severity", "kinds", "close_timeout_s"],
    "links": ["grafana_url", "wandb_run_url", "runbook_url", "prometheus_url"],
}
GOOD = {"slack": {"channel": "C0123ABCD"}, "wandb": {"project": "p", "mode": "offline"},
        "alertmanager": {"url": "http://127.0.0.1:9"}, "notify": {}, "links": {}}


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for table, keys in KEYS.items():
        if draw(st.booleans()):
            values = dict(GOOD[table]) if draw(st.booleans()) else {}
            for key in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
                values[key] = draw(TOML_VALUE)
            doc[table] = values if draw(st.integers(0, 9)) else draw(TOML_VALUE)  # now and then not a table
    return doc


@SETTINGS
@given(doc=documents())
def test_any_toml_values_load_or_give_a_config_error(doc: dict[str, Any]) -> None:
    env = {"SLACK_BOT_TOKEN": "xoxb-property-test"}
    try:
        cfg = load_alerting_config(doc, source="rankwatch.toml", environ=env)
    except ConfigError as exc:
        assert str(exc).startswith("rankwatch.toml: ") and "\n" not in str(exc)
        return
    numbers = [getattr(part, f) for part in (cfg.slack, cfg.wandb, cfg.alertmanager, cfg.notify)
               if part is not None for f in part.__dataclass_fields__]
    for n in numbers:
        if isinstance(n, int | float) and not isinstance(n, bool):
            assert math.isfinite(n) and 0 <= n <= max(MAX_SECONDS, 10_000)
    # What loads also starts: the notifiers are built and an outbox opens.
    with tempfile.TemporaryDirectory() as tmp:
        targets = _make_targets(cfg, Path(tmp))
        sink = AlertSink(cfg, state_dir=Path(tmp), start_thread=False, targets=targets, require_outbox=True)
        sink.close()


@pytest.mark.parametrize("table, key, value", [
    ("notify", "retry_interval_s", float("inf")),
    ("notify", "group_wait_s", float("nan")),
    ("notify", "renotify_interval_s", 1e308),
    ("slack", "timeout_s", float("nan")),
    ("slack", "api_url", "ftp://slack.example/api/"),
    ("slack", "channel", "C0123 ABC\n"),
    ("notify", "kinds", ["stragler"]),
    ("slack", "bot_token_file", "a\x00b"),
])
def test_values_found_by_the_property_test_are_refused(table: str, key: str, value: Any) -> None:
    doc: dict[str, Any] = {"slack": {"channel": "C0123ABCD"}}
    doc.setdefault(table, {})[key] = value
    with pytest.raises(ConfigError, match=f"{table}.{key}"):
        load_alerting_config(doc, environ={"SLACK_BOT_TOKEN": "xoxb-1"})


@SETTINGS
@given(content=st.binary(max_size=200) | LABEL.map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_secret_files_are_one_printable_line_or_an_error_without_the_content(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "secret"
        path.write_bytes(content)
        try:
            secret = read_secret_file(path, what="token")
        except SecretError as exc:
            msg = str(exc)
            assert str(path) in msg
            stripped = content.strip()
            if len(stripped) >= 8:
                assert stripped.decode("utf-8", "replace") not in msg
            return
    assert secret and secret.isprintable() and secret == secret.strip()
    assert secret.encode() in content
