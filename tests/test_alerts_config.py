"""The [slack]/[wandb]/[alertmanager]/[notify]/[links] tables: validation and secrets."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from rankwatch.alerts import AlertSink, build_sink, load_alerting_config
from rankwatch.errors import ConfigError
from rankwatch.events import Event


def test_nothing_configured_means_no_sink(tmp_path: Path) -> None:
    assert build_sink({"interval_s": 15}, state_dir=tmp_path, environ={}) is None
    assert build_sink({"slack": {"channel": "C1"}}, state_dir=tmp_path, environ={}) is None


@pytest.mark.parametrize("doc, key", [
    ({"slack": {"webhook_url": "https://hooks.slack.com/services/T/B/X"}}, "slack.webhook_url"),
    ({"slack": {"chanel": "C1"}}, "slack.chanel"),
    ({"slack": {"max_retries": -1}}, "slack.max_retries"),
    ({"slack": {"enabled": True}}, "slack.enabled"),
    ({"wandb": {"mode": "offline"}}, "wandb.project"),
    ({"wandb": {"project": "p", "mode": "disabled"}}, "wandb.mode"),
    ({"alertmanager": {"url": "alertmanager:9093"}}, "alertmanager.url"),
    ({"notify": {"min_severity": "page"}}, "notify.min_severity"),
    ({"notify": {"group_wait_s": "30s"}}, "notify.group_wait_s"),
    ({"notify": {"max_per_minute": 0}}, "notify.max_per_minute"),
    ({"links": {"grafana_url": "https://g/d/x?var-host={hostname}"}}, "links.grafana_url"),
    ({"slack": "yes"}, "[slack]"),
])
def test_bad_values_name_the_key(doc: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_alerting_config(doc, source="detector.toml", environ={})


def test_bot_token_needs_a_channel() -> None:
    with pytest.raises(ConfigError, match="slack.channel"):
        load_alerting_config({}, environ={"SLACK_BOT_TOKEN": "xoxb-1"})


def test_secrets_from_env_or_file_and_never_shown(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = tmp_path / "token"
    secret.write_text("xoxb-very-secret\n")
    cfg = load_alerting_config({"slack": {"bot_token_file": str(secret), "channel": "C1"}}, environ={})
    assert cfg.slack is not None and cfg.slack.bot_token == "xoxb-very-secret" and cfg.slack.mode == "bot"
    assert "very-secret" not in repr(cfg)
    cfg = load_alerting_config({"slack": {"webhook_url_env": "MY_HOOK"}},
                               environ={"MY_HOOK": "https://hooks.slack.com/services/T/B/secret"})
    assert cfg.slack is not None and cfg.slack.mode == "webhook" and "secret" not in repr(cfg)
    with pytest.raises(ConfigError, match="slack.bot_token_file") as err:
        load_alerting_config({"slack": {"bot_token_file": str(tmp_path / "missing")}}, environ={})
    assert "Traceback" not in str(err.value)
    # A failed delivery logs the error, not the URL.
    with caplog.at_level(logging.DEBUG):
        sink = build_sink({"slack": {"max_retries": 0}, "notify": {"group_wait_s": 0, "close_timeout_s": 0}},
                          state_dir=tmp_path / "s",
                          environ={"SLACK_WEBHOOK_URL": "http://127.0.0.1:9/services/T/B/hook-secret"})
        assert isinstance(sink, AlertSink)
        sink.publish([Event(time=1.0, kind="hang", state="firing", run="r", rank=None, node=None, gpu=None,
                            score=0.0, summary="stuck", episode="e1")])
        sink.deliver_due()
        sink.close()
    assert "slack firing not delivered" in caplog.text
    assert "hook-secret" not in caplog.text


def test_defaults() -> None:
    cfg = load_alerting_config({"alertmanager": {"url": "http://am:9093/"}}, environ={})
    assert cfg.slack is None and cfg.wandb is None
    assert cfg.alertmanager is not None and cfg.alertmanager.url == "http://am:9093"
    assert cfg.notify.group_wait_s == 30 and cfg.notify.renotify_interval_s == 4 * 3600
    assert cfg.notify.min_severity == "warning"
