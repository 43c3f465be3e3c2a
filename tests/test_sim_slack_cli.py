"""`rankwatch sim slack` / `python -m rankwatch.sim.slack`: a local Slack that runs until
stopped, prints each message, keeps --dump up to date, and that `rankwatch alerts send-test`
(the real slack_sdk client) delivers to."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slack_sdk import WebClient, WebhookClient
from slack_sdk.errors import SlackApiError

from rankwatch.cli import main


def test_module_help_shows_the_command(capsys) -> None:
    res = subprocess.run([sys.executable, "-m", "rankwatch.sim.slack", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0
    assert res.stdout.startswith("usage: rankwatch sim slack") and "--dump FILE" in res.stdout and "--port P" in res.stdout


def _dump(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return []


def _wait(pred, proc: subprocess.Popen, what: str) -> None:
    for _ in range(1200):
        assert proc.poll() is None, f"the server exited while waiting for {what}"
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"never saw {what}")


def test_runs_until_stopped_and_dumps_every_message(tmp_path: Path, subprocess_env, capsys,
                                                     monkeypatch) -> None:
    dump = tmp_path / "slack.json"
    env = {**subprocess_env, "SLACK_BOT_TOKEN": "xoxb-local-test"}
    proc = subprocess.Popen([sys.executable, "-m", "rankwatch.sim.slack", "--port", "0", "--dump", str(dump)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline()
        assert first.startswith("local Slack on http://127.0.0.1:"), first + proc.stderr.read()
        url = first.split()[-1]
        banner = [proc.stdout.readline() for _ in range(7)]
        assert f'  api_url = "{url}/api/"\n' in banner and "xoxb-local-test" not in "".join(banner)
        assert _dump(dump) == []

        web = WebClient(token="xoxb-local-test", base_url=f"{url}/api/")
        posted = web.chat_postMessage(channel="C0RANKWATCH", text="Straggler: rank 37 <b>[bold]</b>")
        web.chat_postMessage(channel="C0RANKWATCH", text="details", thread_ts=posted["ts"])
        WebhookClient(f"{url}/services/T0/B0/x").send(text="via the webhook")
        with pytest.raises(SlackApiError) as bad:
            WebClient(token="xoxb-wrong", base_url=f"{url}/api/").chat_postMessage(channel="C0RANKWATCH", text="no")
        assert bad.value.response["error"] == "invalid_auth"
        _wait(lambda: len(_dump(dump)) == 3, proc, "three messages in the dump")

        # the real alert path: send-test through slack_sdk's WebClient with the shipped retry handlers
        cfg = tmp_path / "detector.toml"
        cfg.write_text(f'[slack]\nchannel = "C0RANKWATCH"\napi_url = "{url}/api/"\nchart = false\n')
        monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-local-test")
        assert main(["alerts", "send-test", "--config", str(cfg), "--run", "cli-test"]) == 0
        assert "slack         firing    ok" in capsys.readouterr().out
        _wait(lambda: any("cli-test" in (m["text"] or "") for m in _dump(dump)), proc, "the test alert")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    messages = _dump(dump)
    assert [m["text"] for m in messages[:3]] == ["Straggler: rank 37 <b>[bold]</b>", "details", "via the webhook"]
    assert messages[1]["thread_ts"] == messages[0]["ts"] and messages[2]["via"] == "webhook"
    assert "api message" in out and "Straggler: rank 37 <b>[bold]</b>" in out
    assert "answered 200 invalid_auth" in out
    assert "chat.update of message" in out  # send-test's resolved rewrites its message
    assert out.rstrip("\n").splitlines()[-1].startswith("stopped after ") and out.endswith("\n")
    assert "Traceback" not in err


def test_bad_options_are_one_line_errors(tmp_path: Path, capsys) -> None:
    assert main(["sim", "slack", "--port", "70000"]) == 2
    assert "--port: expected 0-65535" in capsys.readouterr().err
    assert main(["sim", "slack", "--port", "0", "--dump", str(tmp_path / "no" / "such" / "dir.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
