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


def _ev(run: str, rank: int, state: str, t: float, kind: str = "straggler", **kw) -> str:
    from rankwatch.events import Event

    return Event(time=t, kind=kind, state=state, run=run, rank=rank, node=f"node-{rank // 8:02d}", gpu=str(rank % 8),
                 score=7.0, summary=f"Rank {rank} is {state}.", episode=f"{run}/{kind}/{rank}",
                 evidence={"explanation": [], "compute_slowdown": 0.2}, since=t, **kw).to_json()


def test_preview_groups_a_file_of_events_per_run_and_episode_state(tmp_path: Path, capsys) -> None:
    """Several events, as the detector wrote them: one message per incident (run), resolved
    episodes counted as resolved, a fully resolved incident rendered as resolved."""
    t = 1_795_750_000.0
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join([
        _ev("run-a", 3, "firing", t), _ev("run-a", 4, "firing", t + 15),
        _ev("run-b", 9, "firing", t + 20),
        _ev("run-a", 3, "resolved", t + 300),
        _ev("run-b", 9, "resolved", t + 400),
        _ev("run-b", 9, "resolved", t + 415),  # a duplicate, as after a restart: ignored
    ]) + "\n")
    assert main(["alerts", "preview", "--event", str(events), "--format", "text"]) == 0
    out = capsys.readouterr().out
    blocks = out.split("── incident ")[1:]
    assert len(blocks) == 2, out
    assert blocks[0].startswith("1 of 2 · run run-a · firing · 1 of 2 episodes firing")
    assert "Affected ranks: 3–4 (1 of 2 still firing)" in blocks[0]
    assert blocks[1].startswith("2 of 2 · run run-b · resolved · 0 of 1 episodes firing")
    assert "[Resolved]" in blocks[1] and "Resolved: " in blocks[1] and "run-a" not in blocks[1]
    # no links without --config, and no empty "why:" for an empty explanation
    assert "example.com" not in out and "http" not in out
    assert "why:" not in out
    assert out.endswith("\n")

    assert main(["alerts", "preview", "--event", str(events), "--format", "blocks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    msgs = [json.loads(line) for line in lines]
    assert [m["text"].split("]")[0] for m in msgs] == ["[WARNING", "[Resolved"]


def test_preview_links_come_from_the_config_only(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "detector.toml"
    cfg.write_text('[links]\nrunbook_url = "https://runbooks.internal/{alert}"\n'
                   '[slack]\nchannel = "C1"\n')  # a target whose token is not set: not needed to preview
    assert main(["alerts", "preview", "--config", str(cfg), "--format", "text"]) == 0
    out = capsys.readouterr().out
    assert "Runbook: https://runbooks.internal/" in out and "grafana" not in out.lower()


def test_preview_names_the_line_of_a_bad_event(tmp_path: Path, capsys) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text(_ev("run-a", 3, "firing", 1.0) + "\n{not json\n")
    assert main(["alerts", "preview", "--event", str(events)]) == 2
    err = capsys.readouterr().err
    assert f"{events}:2: not a detector event" in err and "Traceback" not in err
