"""Cost of the alert outbox for the detector: how long ``AlertSink.publish`` blocks a detector
cycle, and how long an event takes to reach Slack (the local Slack API server) through the
outbox, against a bare slack_sdk ``chat_postMessage`` to the same server as the baseline.

    .venv/bin/python bench/bench_alerts.py [--cycles 200] [--ranks 256]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from slack_sdk import WebClient

from rankwatch.alerts import AlertSink, load_alerting_config
from rankwatch.events import Event
from rankwatch.sim.slack import SlackServer


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--ranks", type=int, default=256)
    args = ap.parse_args()
    slack = SlackServer().start()
    try:
        doc = {"slack": {"channel": slack.channel, "api_url": slack.api_url, "chart": False},
               "notify": {"group_wait_s": 0, "min_interval_s": 0, "max_per_minute": 10**6, "close_timeout_s": 30}}
        cfg = load_alerting_config(doc, environ={"SLACK_BOT_TOKEN": slack.token})
        with tempfile.TemporaryDirectory() as tmp:
            sink = AlertSink(cfg, state_dir=Path(tmp))
            # 1. publish() of a cycle in which every rank fires (worst case: one transaction).
            big = []
            for c in range(20):
                events = [Event(time=1e9 + c * 1000, kind="straggler", state="firing", run=f"run{c}", rank=r,
                                node=f"n{r // 8}", gpu=str(r % 8), score=5.0, summary="slow", episode=f"c{c}r{r}")
                          for r in range(args.ranks)]
                t = time.perf_counter()
                sink.publish(events)
                big.append(time.perf_counter() - t)
            # 2. publish() of an ordinary cycle (nothing new) and of one new episode, timed to Slack.
            empty, one, to_slack = [], [], []
            for c in range(args.cycles):
                t = time.perf_counter()
                sink.publish([])
                empty.append(time.perf_counter() - t)
                n_before = len(slack.messages)
                ev = Event(time=2e9 + c * 1000, kind="hang", state="firing", run=f"h{c}", rank=None, node=None,
                           gpu=None, score=0.0, summary="stuck", episode=f"h{c}", severity="critical")
                t = time.perf_counter()
                sink.publish([ev])
                one.append(time.perf_counter() - t)
                while len(slack.messages) == n_before:
                    time.sleep(0.0005)
                to_slack.append(time.perf_counter() - t)
            sink.close()
        # Baseline: the same message straight through slack_sdk, no outbox.
        client = WebClient(token=slack.token, base_url=slack.api_url)
        bare = []
        for _ in range(args.cycles):
            t = time.perf_counter()
            client.chat_postMessage(channel=slack.channel, text="stuck", blocks=[{"type": "section", "text": {
                "type": "mrkdwn", "text": "stuck"}}])
            bare.append(time.perf_counter() - t)
    finally:
        slack.stop()
    ms = 1000.0
    print(f"publish, {args.ranks} firing events in one cycle: median {statistics.median(big) * ms:.1f} ms, "
          f"max {max(big) * ms:.1f} ms")
    print(f"publish, empty cycle: median {statistics.median(empty) * ms:.3f} ms, p99 {pct(empty, 0.99) * ms:.3f} ms")
    print(f"publish, one new episode: median {statistics.median(one) * ms:.2f} ms, p99 {pct(one, 0.99) * ms:.2f} ms")
    print(f"event -> Slack through the outbox: median {statistics.median(to_slack) * ms:.1f} ms, "
          f"p99 {pct(to_slack, 0.99) * ms:.1f} ms")
    print(f"baseline chat_postMessage alone:   median {statistics.median(bare) * ms:.1f} ms, "
          f"p99 {pct(bare, 0.99) * ms:.1f} ms")
    print(f"outbox overhead per notification: {statistics.median(to_slack) / statistics.median(bare):.2f}x the bare call")


if __name__ == "__main__":
    main()
