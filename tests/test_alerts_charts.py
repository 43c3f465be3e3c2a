"""The Slack chart: a pure PNG renderer, fed from a real Prometheus range query."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.image import imread

from rankwatch import promserver
from rankwatch.alerts.charts import ComputeSeries, render_compute_chart, series_from_prometheus
from rankwatch.events import Event

T0 = 1_750_000_000


def test_chart_is_a_png_with_the_culprit_in_red() -> None:
    t = [T0 + 15 * i for i in range(240)]
    data = ComputeSeries(t, [1.0] * 120 + [1.3] * 120, [1.0] * 240, [0.97] * 240, [1.03] * 240, onset=T0 + 1800)
    png = render_compute_chart(data, title="run r1 rank 37: compute time per step vs peers", culprit_label="rank 37")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(io.BytesIO(png))
    assert img.shape[0] >= 300 and img.shape[1] >= 800
    red = (img[..., 0] > 0.8) & (img[..., 1] < 0.3) & (img[..., 2] < 0.3)
    assert red.sum() > 200  # the culprit's line is drawn


def test_series_from_a_real_prometheus(tmp_path: Path, prometheus_factory) -> None:
    # Three ranks of one pp stage; rank 2 computes 30 % longer from minute 30 on.
    lines = []
    for name, typ in (("rankwatch_steps", "counter"), ("rankwatch_section_seconds", "counter"),
                      ("rankwatch_rank_info", "gauge")):
        lines.append(f"# TYPE {name} {typ}")
        for rank in range(3):
            for i in range(0, 3600 + 1, 15):
                ts = T0 + i
                base = f'run="r1",rank="{rank}",node="n1",local_rank="{rank}"'
                if name == "rankwatch_steps":
                    lines.append(f"rankwatch_steps_total{{{base}}} {i} {ts}")
                elif name == "rankwatch_rank_info":
                    lines.append(f'rankwatch_rank_info{{{base},pp="0"}} 1 {ts}')
                else:
                    slow = 1.3 if rank == 2 and i > 1800 else 1.0
                    fwd = i * 1.0 if not (rank == 2 and i > 1800) else 1800 + (i - 1800) * slow
                    lines.append(f'rankwatch_section_seconds_total{{{base},section="forward"}} {fwd} {ts}')
                    lines.append(f'rankwatch_section_seconds_total{{{base},section="comm"}} {i * 0.2} {ts}')
    # OpenMetrics wants one family's samples together, ordered by series then time.
    om = tmp_path / "data.om"
    om.write_text("\n".join(lines) + "\n# EOF\n")
    tsdb = tmp_path / "tsdb"
    promserver.backfill_openmetrics(om, tsdb)
    prom = prometheus_factory("global: {}\n", storage_dir=tsdb)
    ev = Event(time=T0 + 3600, kind="straggler", state="firing", run="r1", rank=2, node="n1", gpu="2", score=9,
               summary="", since=T0 + 1850)
    data = series_from_prometheus(prom.url, ev, window_s=3600, step_s=60)
    assert data is not None
    cul, med = np.asarray(data.culprit), np.asarray(data.peer_median)
    assert len(cul) > 40
    assert np.allclose(med, 1.0) and np.allclose(cul[:20], 1.0)  # comm time is not compute
    assert np.allclose(cul[-10:], 1.3)
