"""The probe's W&B side: throughput and cross-rank section spread into the run's history, and
an alert when the training loop fails or finishes.

* Every ``every`` completed steps, rank 0 logs (``run.log(..., commit=False)``, so the values
  join the row the training script commits next and never move its step counter):
  ``rankwatch/step``, ``rankwatch/step_time_s``, ``rankwatch/steps_per_s``,
  ``rankwatch/tokens_per_s`` and ``rankwatch/section/<name>_s`` (seconds per step) of rank 0
  over the interval. ``define_metric("rankwatch/*", step_metric="rankwatch/step")`` gives the
  charts the training step as x axis.
* Cross-rank spread needs every rank's numbers on rank 0, which is a collective. It is opt-in
  (``Probe(wandb_gather=True)`` on every rank): at the same step count on every rank each rank
  sends a ~200-byte summary with ``gather_object`` to rank 0 over a gloo group (created on the
  first gather, so an NCCL job pays no GPU synchronisation); rank 0 then logs
  ``rankwatch/spread/<name>/{min_s,min_rank,median_s,max_s,max_rank,rel_spread}`` and
  ``rankwatch/tokens_per_s_all_ranks``. Without it, the cross-rank view lives in Prometheus
  (where the detector computes it) and W&B gets rank 0's numbers only.
* ``finish(exc)``: ``run.alert`` with level ERROR "failed" (``exc`` is the exception that ended
  the loop) or INFO "completed".
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rankwatch.exporters.probe import Probe, ProbeTotals


def interval_summary(prev: ProbeTotals, cur: ProbeTotals, wall_seconds: float, rank: int) -> dict[str, Any]:
    """What one rank contributes to a report: per-step means over the interval (pure)."""
    steps = cur.steps - prev.steps
    sections: dict[str, float] = {}
    for name, (sec, _n) in cur.sections.items():
        before = prev.sections.get(name, (0.0, 0))[0]
        if steps > 0:
            sections[name] = (sec - before) / steps
    return {
        "rank": rank,
        "steps": steps,
        "step_time_s": (cur.step_seconds - prev.step_seconds) / steps if steps else None,
        "tokens": cur.tokens - prev.tokens,
        "wall_s": wall_seconds,
        "sections": sections,
    }


def spread(summaries: list[dict[str, Any]]) -> dict[str, float]:
    """Cross-rank statistics of per-step section times (pure): min/median/max, the ranks with
    the min and the max (a straggler has the max compute and the min ``comm``), and
    ``rel_spread = (max - median) / median``."""
    out: dict[str, float] = {}
    names = sorted({n for s in summaries for n in s["sections"]})
    for name in names:
        vals = [(s["sections"][name], s["rank"]) for s in summaries if name in s["sections"]]
        if not vals:
            continue
        times = [v for v, _ in vals]
        med = statistics.median(times)
        top, top_rank = max(vals)
        low, low_rank = min(vals)
        key = f"rankwatch/spread/{name}"
        out[f"{key}/min_s"] = low
        out[f"{key}/min_rank"] = low_rank
        out[f"{key}/median_s"] = med
        out[f"{key}/max_s"] = top
        out[f"{key}/max_rank"] = top_rank
        out[f"{key}/rel_spread"] = (top - med) / med if med > 0 else 0.0
    walls = [s["wall_s"] for s in summaries if s["wall_s"] > 0]
    if walls:
        out["rankwatch/tokens_per_s_all_ranks"] = sum(s["tokens"] for s in summaries) / statistics.median(walls)
    return out


class WandbReporter:
    """Created by :class:`~rankwatch.exporters.probe.Probe`; ``run=None`` with ``auto`` looks
    for ``wandb.run`` (rank 0 only) at each step until one appears."""

    def __init__(self, probe: Probe, run: Any, *, every: int, gather: bool, auto: bool) -> None:
        self._probe = probe
        self._run: Any = None
        self._auto = auto
        self.every = every
        self.gather = gather
        self._group: Any = None
        self._gather_ok = True
        self._prev = probe.totals()
        self._prev_wall = time.monotonic()
        self._finished = False
        if run is not None:
            self._bind(run)

    @property
    def run(self) -> Any:
        return self._run

    def _may_log(self) -> bool:
        return not self._auto or self._probe.identity.rank == 0

    def _bind(self, run: Any) -> None:
        from rankwatch.exporters.probe import install_atexit

        self._run = run
        try:
            run.define_metric("rankwatch/*", step_metric="rankwatch/step")
        except Exception as exc:
            self._probe._fail("wandb-define-metric", exc)
        install_atexit()

    def _resolve(self) -> Any:
        if self._run is None and self._auto and self._probe.identity.rank == 0:
            wandb = sys.modules.get("wandb")
            run = getattr(wandb, "run", None) if wandb is not None else None
            if run is not None:
                self._bind(run)
        return self._run

    def on_step(self, steps: int) -> None:
        if self._run is None and self._auto:
            self._resolve()
        if steps % self.every == 0:
            self.report()

    def report(self) -> None:
        p = self._probe
        cur = p.totals()
        now = time.monotonic()
        local = interval_summary(self._prev, cur, now - self._prev_wall, p.identity.rank)
        self._prev, self._prev_wall = cur, now
        gathered = self._gather(local) if self.gather else None
        run = self._run
        if run is None or not self._may_log() or not local["steps"]:
            return
        data: dict[str, Any] = {
            "rankwatch/step": cur.step if cur.step is not None else cur.steps,
            "rankwatch/step_time_s": local["step_time_s"],
            "rankwatch/steps_per_s": local["steps"] / local["wall_s"] if local["wall_s"] > 0 else None,
            "rankwatch/tokens_per_s": local["tokens"] / local["wall_s"] if local["wall_s"] > 0 else None,
        }
        for name, sec in local["sections"].items():
            data[f"rankwatch/section/{name}_s"] = sec
        if gathered:
            data.update(spread(gathered))
        try:
            run.log({k: v for k, v in data.items() if v is not None}, commit=False)
        except Exception as exc:
            p._fail("wandb-log", exc)

    def _gather(self, local: dict[str, Any]) -> list[dict[str, Any]] | None:
        if not self._gather_ok:
            return None
        dist = sys.modules.get("torch.distributed")
        try:
            if dist is None or not dist.is_available() or not dist.is_initialized():
                return None
            if self._group is None:
                # A CPU-side group: gather_object over NCCL would copy to the GPU and synchronise.
                self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
            rank = dist.get_rank()
            out: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
            dist.gather_object(local, out, dst=0, group=self._group)
            return [s for s in out if s] if out is not None else None
        except Exception as exc:
            # A failed collective can leave the group unusable: never try again in this run.
            self._gather_ok = False
            self._probe._fail("wandb-gather", exc)
            return None

    def finish(self, exc: BaseException | None) -> None:
        if self._finished:
            return
        self._finished = True
        run = self._resolve()
        if run is None or not self._may_log():
            return
        p = self._probe
        t = p.totals()
        failed = exc is not None and not (isinstance(exc, SystemExit) and exc.code in (0, None))
        where = f"rank {p.identity.rank} on {p.identity.node}"
        progress = f"{t.steps} steps completed (last step {t.step if t.step is not None else t.steps})"
        if failed:
            title = f"Training run {p.run} failed"
            text = f"{where}: {type(exc).__name__}: {exc}. {progress}."
            level = "ERROR"
        else:
            title = f"Training run {p.run} completed"
            text = f"{where}: {progress}, {t.tokens} tokens on this rank."
            level = "INFO"
        try:
            run.alert(title=title[:63], text=text, level=level)
        except Exception as err:
            p._fail("wandb-alert", err)
