"""Label values with markup: the run label (Probe(run=…)) and the node label (RANKWATCH_NODE) come
from whoever starts a training job. In Slack they must stay text: no channel ping, no disguised
link. Checked through the real slack_sdk client and the local Slack server, W&B offline, the
shipped alertmanager.yml in a real Alertmanager posting to the local Slack webhook, and the
chart renderer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import requests
import yaml

from rankwatch import promserver
from rankwatch.alerts import AlertSink, load_alerting_config
from rankwatch.alerts.charts import ComputeSeries, render_compute_chart
from rankwatch.alerts.wandb_notifier import offline_alerts
from rankwatch.assets import asset_dir
from rankwatch.events import Event
from rankwatch.sim.slack import SlackServer

T0 = 1_790_000_000.0
PING = "<!channel>"
LINK = "<https://evil.example|click here>"
RUN = f"{PING} llama & co"
NODE = LINK


def hostile(state: str = "firing", t: float = T0, rank: int = 5) -> Event:
    return Event(time=t, kind="straggler", state=state, run=RUN, rank=rank, node=NODE, gpu="<!here>",
                 score=7.5, summary=f"Rank {rank} on {NODE} computes 20 % slower than its peers in {RUN}.",
                 evidence={"slowdown": 0.2, "peer_group": f"{RUN}|pp=0", "explanation": [f"node {NODE} is hot"]},
                 episode=f"{RUN}/straggler/{rank}", since=t - 30)


def mrkdwn_texts(message: Any) -> list[str]:
    """Every text Slack parses as mrkdwn: the notification text and every mrkdwn object."""
    out = [message.text]
    for b in message.blocks or []:
        for obj in [b.get("text")] + (b.get("fields") or []) + (b.get("elements") or []):
            if isinstance(obj, dict) and obj.get("type") == "mrkdwn":
                out.append(obj["text"])
    return out


def assert_inert(texts: list[str]) -> None:
    for text in texts:
        assert PING not in text and "<!here>" not in text and "<https://evil" not in text, text
        # Only rankwatch's own markup may open a control sequence: Slack's date formatting.
        assert all(chunk.startswith("!date^") for chunk in text.split("<")[1:]), text


def test_slack_message_and_thread_keep_label_markup_as_text(tmp_path: Path, slack: SlackServer) -> None:
    doc = {"slack": {"channel": slack.channel, "api_url": slack.api_url, "chart": False},
           "notify": {"group_wait_s": 0, "min_interval_s": 0, "close_timeout_s": 5}}
    sink = AlertSink(load_alerting_config(doc, environ={"SLACK_BOT_TOKEN": slack.token}), state_dir=tmp_path,
                     start_thread=False)
    sink.publish([hostile(), hostile(rank=6)])
    assert sink.flush(timeout=60) == 0
    sink.publish([hostile("resolved", T0 + 600), hostile("resolved", T0 + 600, rank=6)])
    assert sink.flush(timeout=60) == 0
    sink.close()
    [msg] = slack.top_level_messages()
    texts = mrkdwn_texts(msg) + [e["text"] for e in msg.edits] + [r.text for r in slack.thread(msg.ts)]
    assert_inert(texts)
    joined = "\n".join(texts)
    assert "&lt;!channel&gt; llama &amp; co" in joined and "&lt;https://evil.example|click here&gt;" in joined
    # The header is plain_text, which Slack never parses: the label shows as typed.
    assert msg.blocks[0]["text"]["type"] == "plain_text"


def test_wandb_alert_text_is_escaped(tmp_path: Path) -> None:
    # W&B forwards alerts to the team's Slack channel.
    doc = {"wandb": {"project": "p", "mode": "offline", "log_scores": False}, "notify": {"group_wait_s": 0}}
    sink = AlertSink(load_alerting_config(doc, environ={}), state_dir=tmp_path, start_thread=False)
    sink.publish([hostile()])
    assert sink.flush(timeout=120) == 0
    sink.close()
    [alert] = offline_alerts(tmp_path / "wandb")
    assert_inert([alert["title"], alert["text"]])
    assert "&lt;https://evil.example|click here&gt;" in alert["text"]


def test_alertmanager_slack_template_escapes_labels_and_annotations(tmp_path: Path, slack: SlackServer) -> None:
    """The shipped alertmanager.yml, its Slack receiver posting to the local Slack webhook."""
    cfg = yaml.safe_load((asset_dir("alerts") / "alertmanager.yml").read_text())
    hook = tmp_path / "slack_webhook_url"
    hook.write_text(slack.webhook_url)
    for receiver in cfg["receivers"]:
        for sc in receiver.get("slack_configs", []):
            sc["api_url_file"] = str(hook)
    cfg["route"]["group_wait"] = "0s"  # deliver now, not in 30 s
    am = promserver.start_alertmanager(yaml.safe_dump(cfg), workdir=tmp_path / "am")
    try:
        alert = {"labels": {"alertname": "RankwatchRankStraggler", "severity": "warning", "run": RUN,
                            "Hostname": NODE},
                 "annotations": {"summary": f"{PING} rank 5 is slow on {NODE}",
                                 "description": f"Run {RUN}: {LINK}", "runbook_url": "https://runbooks.example/x"}}
        r = requests.post(am.url + "/api/v2/alerts", json=[alert], timeout=10)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 120  # a bound for a broken setup, not a timing assertion
        while not slack.messages and time.monotonic() < deadline and am.proc.poll() is None:
            time.sleep(0.1)
    finally:
        am.stop()
    [msg] = slack.messages
    [att] = msg.attachments
    assert_inert([att["title"], att["text"]])
    assert "run &lt;!channel&gt; llama &amp; co" in att["title"]
    assert "&lt;https://evil.example|click here&gt;" in att["text"]


def test_chart_title_with_dollar_signs_renders(tmp_path: Path) -> None:
    # matplotlib reads $…$ as mathtext: a run label with an unbalanced "\frac{" in it made
    # savefig raise, and the chart was lost.
    data = ComputeSeries(t=[T0, T0 + 15, T0 + 30], culprit=[1.2, 1.3, 1.25], peer_median=[1.0, 1.0, 1.0])
    png = render_compute_chart(data, title=r"run $\frac{cost$ rank 5: compute time per step vs peers")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
