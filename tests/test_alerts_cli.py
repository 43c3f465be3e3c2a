"""`rankwatch alerts …` subcommands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rankwatch.cli import main
from rankwatch.sim.slack import SlackServer


def test_preview_prints_block_kit_and_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["alerts", "preview", "--format", "blocks"]) == 0
    msg = json.loads(capsys.readouterr().out)
    assert msg["blocks"][0]["type"] == "header" and "rank 37" in msg["blocks"][0]["text"]["text"]
    assert main(["alerts", "preview", "--format", "text"]) == 0
    text = capsys.readouterr().out
    assert "Where: rank 37 · node p5-012 · GPU 3" in text and "≈16 % job throughput lost" in text


def test_send_test_and_outbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    slack = SlackServer().start()
    try:
        cfg = tmp_path / "cfg.toml"
        cfg.write_text(f'[slack]\nchannel = "{slack.channel}"\napi_url = "{slack.api_url}"\n')
        monkeypatch.setenv("SLACK_BOT_TOKEN", slack.token)
        assert main(["alerts", "send-test", "--config", str(cfg)]) == 0
        assert "slack         firing    ok" in capsys.readouterr().out
        assert len(slack.top_level_messages()) == 1 and len(slack.calls("chat.update")) == 1

        monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-wrong")
        assert main(["alerts", "send-test", "--config", str(cfg)]) == 1
        out = capsys.readouterr().out
        assert "FAILED: Slack API error invalid_auth" in out and "xoxb-wrong" not in out
    finally:
        slack.stop()
    assert main(["alerts", "outbox", "--state-dir", str(tmp_path / "none")]) == 2
    assert "no outbox here" in capsys.readouterr().err
