"""The in-process step probe: per-rank step and section timings, served for Prometheus.

::

    probe = rankwatch.Probe(run="llama70b-cpt")       # serves :9420+LOCAL_RANK/metrics
    with probe:                                        # W&B alert when the loop fails/finishes
        for batch in loader:
            with probe.step(tokens=batch.numel()):
                with probe.section("forward"):
                    loss = model(batch)
                ...

Design points (the README has the user-facing reference):

* Recording is a few float additions under an uncontended lock; metric families are built
  fresh from those plain counters on each scrape by a custom collector in the probe's own
  ``CollectorRegistry`` (only the probe's series, labels ``run, rank, local_rank, node``).
* Sections may nest (``comm`` inside ``backward``, say); each records its own inclusive time.
  Don't nest a section inside one of the same name: both would count.
* A step or section that ends with an exception records nothing (the step did not complete).
* Nothing here raises into the training loop: errors are logged once per kind and counted in
  ``rankwatch_probe_errors_total``. Only invalid constructor arguments raise, at start-up.
* With CUDA in use, sections are timed with CUDA events read back a step later
  (:mod:`rankwatch.exporters.cuda_timing`); otherwise with ``time.perf_counter``.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from rankwatch.exporters.cuda_timing import CudaSectionTimer
from rankwatch.exporters.identity import RankIdentity

log = logging.getLogger("rankwatch.probe")

DEFAULT_BASE_PORT = 9420
SECTION_NAMES = ("dataloader", "forward", "backward", "optimizer", "comm", "checkpoint")
SERIES_LABELS = ("run", "rank", "local_rank", "node")
CLOSE_DRAIN_SECONDS = 2.0


class _Auto:
    def __repr__(self) -> str:
        return "AUTO"


AUTO: Any = _Auto()
"""Default of ``wandb_run``: use ``wandb.run`` on rank 0 when the script has one."""

_perf = time.perf_counter


@dataclass
class ProbeTotals:
    """A consistent copy of a probe's counters (what one scrape exports)."""

    steps: int = 0
    step_seconds: float = 0.0
    tokens: int = 0
    sections: dict[str, tuple[float, int]] = field(default_factory=dict)
    last_step_time: float | None = None
    step: int | None = None
    errors: int = 0


class _Section:
    """Context manager of one section entry; a fresh one per entry, so nesting and threads work."""

    __slots__ = ("_probe", "_name", "_t0", "_ev")

    def __init__(self, probe: Probe, name: str) -> None:
        self._probe = probe
        self._name = name
        self._ev = None

    def __enter__(self) -> _Section:
        cuda = self._probe._cuda
        if cuda is not None:
            try:
                self._ev = cuda.start()
            except Exception as exc:
                self._probe._fail("cuda-record", exc)
        self._t0 = _perf()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        dt = _perf() - self._t0
        if exc_type is not None:
            if self._ev is not None:
                self._probe._discard_event(self._ev)
            return
        p = self._probe
        if self._ev is None:
            # The common case inlined (this runs several times per step): a known section on
            # the host clock. Anything else (and any error) goes through _end_section.
            try:
                with p._lock:
                    s = p._sections.get(self._name)
                    if s is not None:
                        s[0] += dt
                        s[1] += 1
                        return
            except Exception:
                pass
        p._end_section(self._name, dt, self._ev)


class _Step:
    """Context manager of one training step. ``tokens`` may be set inside the block."""

    __slots__ = ("_probe", "tokens", "step", "_t0")

    def __init__(self, probe: Probe, tokens: int | None, step: int | None) -> None:
        self._probe = probe
        self.tokens = tokens
        self.step = step

    def __enter__(self) -> _Step:
        self._probe._step_started()
        self._t0 = _perf()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        dt = _perf() - self._t0
        if exc_type is None:
            self._probe._end_step(dt, self.tokens, self.step, None)


class Probe:
    """Per-rank step/section timer with its own Prometheus endpoint.

    ``run``: training run id (label ``run``). ``port``: where to serve; default
    ``$RANKWATCH_PROBE_BASE_PORT`` (9420) + ``LOCAL_RANK``; ``0`` records without serving.
    ``identity``: default :meth:`RankIdentity.from_env`. ``wandb_run``: a wandb run to report
    to; default: ``wandb.run`` on rank 0 if the script started one; ``None`` disables W&B.
    ``wandb_every``: steps between W&B reports. ``wandb_gather``: every ``wandb_every`` steps
    gather each rank's section means to rank 0 (a collective over a gloo group: pass the same
    value on every rank) so that rank 0 can log the cross-rank spread. ``cuda_timing``: ``None``
    (default) uses CUDA events once the script has initialised CUDA; ``False`` never.
    ``max_sections``: bound on distinct section names (each is a label value).
    """

    def __init__(self, run: str, *, port: int | None = None, addr: str = "0.0.0.0",
                 identity: RankIdentity | None = None, wandb_run: Any = AUTO, wandb_every: int = 100,
                 wandb_gather: bool = False, cuda_timing: bool | None = None, max_sections: int = 32) -> None:
        if not isinstance(run, str) or not run:
            raise ValueError("Probe(run=...) needs a non-empty training run id")
        if wandb_every < 1:
            raise ValueError(f"wandb_every must be >= 1, got {wandb_every}")
        self.run = run
        self.identity = identity if identity is not None else RankIdentity.from_env()
        self._identity_auto = identity is None
        ident = self.identity
        self._labels = (run, str(ident.rank), str(ident.local_rank), ident.node)
        self._lock = threading.Lock()
        self._steps = 0
        self._step_seconds = 0.0
        self._tokens = 0
        self._sections: dict[str, list[float]] = {}
        self._last_step_time: float | None = None
        self._loop_step: int | None = None
        self._errors = 0
        self._logged: set[str] = set()
        self._max_sections = max_sections
        self._open_sections: dict[str, tuple[float, Any]] = {}
        self._open_step: float | None = None
        self._closed = False
        # CUDA: decided at step starts until enabled (CUDA is usually initialised after the probe).
        self._cuda: CudaSectionTimer | None = None
        self._cuda_mode = cuda_timing
        self._cuda_dropped_seen = 0

        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = ProbeCollector(self)
        self.registry.register(self.collector)

        self._httpd: Any = None
        self._http_thread: threading.Thread | None = None
        self.port: int | None = None
        self._serve(self._resolve_port(port), addr)

        self._reporter: Any = None
        if wandb_run is not None or wandb_gather:
            self._setup_reporter(wandb_run, wandb_every, wandb_gather)
        _LIVE.add(self)
        _install_excepthook()

    # ---------------------------------------------------------------- recording API
    def step(self, tokens: int | None = None, step: int | None = None) -> _Step:
        """``with probe.step(tokens=n):`` times one training step. ``step``: the loop's own step
        number (default: the count of completed steps)."""
        return _Step(self, tokens, step)

    def section(self, name: str) -> _Section:
        """``with probe.section("forward"):`` times one section (names in DESIGN.md or your own)."""
        return _Section(self, name)

    def record_step(self, seconds: float, sections: Mapping[str, float] | None = None,
                    tokens: int | None = None, step: int | None = None, end_time: float | None = None) -> None:
        """Record a step measured elsewhere (Megatron timers, a simulator): its wall time, the
        seconds of each section in it, tokens, the loop's step number and the Unix time it
        ended (default now)."""
        try:
            if sections:
                with self._lock:
                    for name, sec in sections.items():
                        self._add_section_locked(name, sec)
            self._end_step(float(seconds), tokens, step, end_time)
        except Exception as exc:
            self._fail("record_step", exc)

    def record_section(self, name: str, seconds: float) -> None:
        """Record one section measured elsewhere (host time; it is not tied to a step)."""
        self._end_section(name, seconds, None)

    def begin_step(self) -> None:
        """Start a step (for callback-style integrations; prefer ``with probe.step()``)."""
        if self._open_step is not None:
            self._fail("begin_step", RuntimeError("begin_step() while a step is open: the open one is discarded"))
        self._step_started()
        self._open_step = _perf()

    def end_step(self, tokens: int | None = None, step: int | None = None) -> None:
        t1 = _perf()
        t0, self._open_step = self._open_step, None
        if t0 is None:
            self._fail("end_step", RuntimeError("end_step() without begin_step()"))
            return
        self._end_step(t1 - t0, tokens, step, None)

    def cancel_step(self) -> None:
        """Forget the open step without recording it (training ended between two steps)."""
        self._open_step = None

    def begin_section(self, name: str) -> None:
        """Start a section (callback-style integrations); one open section per name."""
        try:
            ev = None
            if self._cuda is not None:
                try:
                    ev = self._cuda.start()
                except Exception as exc:
                    self._fail("cuda-record", exc)
            if name in self._open_sections:
                self._fail("begin_section", RuntimeError(f"section {name!r} begun twice: the first is discarded"))
            self._open_sections[name] = (_perf(), ev)
        except Exception as exc:
            self._fail("begin_section", exc)

    def end_section(self, name: str) -> None:
        t1 = _perf()
        try:
            opened = self._open_sections.pop(name, None)
        except Exception as exc:
            self._fail("end_section", exc)
            return
        if opened is None:
            self._fail("end_section", RuntimeError(f"end_section({name!r}) without begin_section"))
            return
        self._end_section(name, t1 - opened[0], opened[1])

    def cancel_section(self, name: str) -> None:
        """Forget an open section without recording it."""
        try:
            opened = self._open_sections.pop(name, None)
        except Exception as exc:
            self._fail("cancel_section", exc)
            return
        if opened is not None and opened[1] is not None:
            self._discard_event(opened[1])

    def section_open(self, name: str) -> bool:
        try:
            return name in self._open_sections
        except Exception:
            return False

    # ---------------------------------------------------------------- reading
    def totals(self) -> ProbeTotals:
        """A consistent copy of the counters. CUDA-timed sections appear once the GPU finished them."""
        with self._lock:
            return ProbeTotals(self._steps, self._step_seconds, self._tokens,
                               {k: (v[0], int(v[1])) for k, v in self._sections.items()},
                               self._last_step_time, self._loop_step, self._errors)

    @property
    def errors(self) -> int:
        return self._errors

    @property
    def url(self) -> str | None:
        return None if self.port is None else f"http://127.0.0.1:{self.port}/metrics"

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> Probe:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.close(exc)

    def close(self, exc: BaseException | None = None) -> None:
        """Finish: resolve pending CUDA timings (polling, never synchronising, for up to 2 s),
        tell W&B whether the job completed or failed (``exc``), stop serving. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        if self._cuda is not None:
            deadline = time.monotonic() + CLOSE_DRAIN_SECONDS
            while self._cuda.pending and time.monotonic() < deadline:
                self._drain_cuda()
                if self._cuda.pending:
                    time.sleep(0.01)
        if self._reporter is not None:
            try:
                self._reporter.finish(exc)
            except Exception as err:
                self._fail("wandb-finish", err)
        self._stop_serving()

    # ---------------------------------------------------------------- internals
    def _step_started(self) -> None:
        if self._cuda is None and self._cuda_mode is not False:
            self._maybe_enable_cuda()

    def _end_section(self, name: str, seconds: float, ev: Any) -> None:
        try:
            if ev is not None:
                self._cuda.stop(name, ev, seconds)  # type: ignore[union-attr]
                return
            with self._lock:
                self._add_section_locked(name, seconds)
        except Exception as exc:
            self._fail("section", exc)

    def _add_section_locked(self, name: str, seconds: float) -> None:
        """One completed section into its totals; the caller holds ``self._lock``."""
        s = self._sections.get(name)
        if s is None:
            s = self._new_section(name)
            if s is None:  # over the section-name cap: counted as an error by _new_section
                return
        s[0] += seconds
        s[1] += 1

    def _new_section(self, name: str) -> list[float] | None:
        # Called with the lock held.
        if not isinstance(name, str) or not name:
            self._fail_locked("section-name", TypeError(f"section name must be a non-empty str, got {name!r}"))
            return None
        if len(self._sections) >= self._max_sections:
            self._fail_locked("section-cap", ValueError(
                f"more than {self._max_sections} distinct section names; {name!r} is not recorded "
                "(section names are label values: keep them few and fixed)"))
            return None
        s = self._sections[name] = [0.0, 0]
        return s

    def _end_step(self, seconds: float, tokens: int | None, step: int | None, end_time: float | None) -> None:
        try:
            now = time.time() if end_time is None else end_time
            with self._lock:
                self._steps += 1
                self._step_seconds += seconds
                if tokens:
                    self._tokens += int(tokens)
                self._last_step_time = now
                self._loop_step = self._steps if step is None else int(step)
                steps = self._steps
            if self._cuda is not None:
                self._drain_cuda()
            if self._reporter is not None:
                self._reporter.on_step(steps)
        except Exception as exc:
            self._fail("step", exc)

    def _drain_cuda(self) -> None:
        cuda = self._cuda
        try:
            done = cuda.poll()  # type: ignore[union-attr]
        except Exception as exc:
            self._fail("cuda-poll", exc)
            return
        if done:
            with self._lock:
                for name, sec in done:
                    s = self._sections.get(name)
                    if s is None:
                        s = self._new_section(name)
                        if s is None:
                            continue
                    s[0] += sec
                    s[1] += 1
        if cuda.dropped != self._cuda_dropped_seen:  # type: ignore[union-attr]
            n = cuda.dropped - self._cuda_dropped_seen  # type: ignore[union-attr]
            self._cuda_dropped_seen = cuda.dropped  # type: ignore[union-attr]
            with self._lock:
                self._errors += n - 1
            self._fail("cuda-pending", RuntimeError(
                f"{cuda.max_pending} CUDA section timings still pending: the GPU is not finishing "  # type: ignore[union-attr]
                "work; oldest timings dropped"))

    def _discard_event(self, ev: Any) -> None:
        if self._cuda is not None:
            self._cuda.abandon(ev)

    def _maybe_enable_cuda(self) -> None:
        torch = sys.modules.get("torch")
        if torch is None:
            if self._cuda_mode:
                self._cuda_mode = False
                self._fail("cuda-enable", RuntimeError("cuda_timing=True but torch is not imported"))
            return
        try:
            if not torch.cuda.is_initialized():
                if self._cuda_mode:
                    torch.cuda.init()
                else:
                    return
            self._cuda = CudaSectionTimer(torch.cuda)
            if self._identity_auto and self.identity.gpu is None:
                self._set_identity(self.identity.with_gpu())
        except Exception as exc:
            self._cuda_mode = False
            self._fail("cuda-enable", exc)

    def _set_identity(self, ident: RankIdentity) -> None:
        self.identity = ident

    def _fail(self, where: str, exc: BaseException) -> None:
        with self._lock:
            self._fail_locked(where, exc)

    def _fail_locked(self, where: str, exc: BaseException) -> None:
        self._errors += 1
        key = f"{where}:{type(exc).__name__}"
        if key not in self._logged:
            self._logged.add(key)
            log.warning("rankwatch probe (run %s, rank %s): %s error, further ones are only counted "
                        "(rankwatch_probe_errors_total): %s", self.run, self.identity.rank, where, exc,
                        exc_info=not isinstance(exc, (RuntimeError, ValueError, TypeError, OSError)))

    def _resolve_port(self, port: int | None) -> int:
        if port is not None:
            return int(port)
        raw = os.environ.get("RANKWATCH_PROBE_BASE_PORT", "")
        try:
            base = int(raw) if raw else DEFAULT_BASE_PORT
        except ValueError:
            raise ValueError(f"RANKWATCH_PROBE_BASE_PORT={raw!r} is not an integer") from None
        return 0 if base == 0 else base + self.identity.local_rank

    def _serve(self, port: int, addr: str) -> None:
        if port == 0:
            return
        from prometheus_client import start_http_server

        try:
            self._httpd, self._http_thread = start_http_server(port, addr=addr, registry=self.registry)
            self.port = int(self._httpd.server_address[1])
        except OSError as exc:
            # Another process (a second job on the node, a leftover rank) holds the port: the
            # job must go on; its timings are still recorded, and W&B still gets them.
            with self._lock:
                self._errors += 1
            log.warning("rankwatch probe (run %s, rank %s): cannot serve metrics on %s:%d (%s); "
                        "recording continues without an endpoint. Set RANKWATCH_PROBE_BASE_PORT or "
                        "Probe(port=...) to use another port.", self.run, self.identity.rank, addr, port,
                        exc.strerror or exc)

    def _stop_serving(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            try:
                httpd.shutdown()
                httpd.server_close()
                if self._http_thread is not None:
                    self._http_thread.join(timeout=5)
            except Exception as exc:
                self._fail("serve-stop", exc)

    def _setup_reporter(self, wandb_run: Any, every: int, gather: bool) -> None:
        explicit = wandb_run is not AUTO
        if not explicit and not gather and self.identity.rank != 0:
            return
        from rankwatch.integrations.wandb_reporter import WandbReporter

        self._reporter = WandbReporter(self, wandb_run if explicit else None, every=every,
                                       gather=gather, auto=not explicit)


class ProbeCollector(Collector):
    """Builds the probe's metric families from its counters on every scrape."""

    def __init__(self, probe: Probe) -> None:
        self._probe = probe

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        p = self._probe
        t = p.totals()
        base = list(SERIES_LABELS)
        lv = list(p._labels)
        info = p.identity.info_labels()
        g = GaugeMetricFamily("rankwatch_rank_info", "Identity of this training rank (value 1)",
                              labels=base + list(info))
        g.add_metric(lv + list(info.values()), 1.0)
        yield g
        c = CounterMetricFamily("rankwatch_steps_total", "Completed training steps", labels=base)
        c.add_metric(lv, t.steps)
        yield c
        c = CounterMetricFamily("rankwatch_step_seconds_total", "Summed wall time of completed steps",
                                labels=base)
        c.add_metric(lv, t.step_seconds)
        yield c
        secs = CounterMetricFamily("rankwatch_section_seconds_total",
                                   "Summed time inside a section (GPU time where CUDA events are used)",
                                   labels=base + ["section"])
        cnt = CounterMetricFamily("rankwatch_section_count_total", "Completed sections",
                                  labels=base + ["section"])
        for name, (s, n) in sorted(t.sections.items()):
            secs.add_metric(lv + [name], s)
            cnt.add_metric(lv + [name], n)
        yield secs
        yield cnt
        c = CounterMetricFamily("rankwatch_tokens_total", "Tokens processed by this rank", labels=base)
        c.add_metric(lv, t.tokens)
        yield c
        if t.last_step_time is not None:
            # Absent until the first step: a 0 here would read as a rank hung since 1970.
            g = GaugeMetricFamily("rankwatch_last_step_timestamp_seconds",
                                  "Unix time the last step finished", labels=base)
            g.add_metric(lv, t.last_step_time)
            yield g
            g = GaugeMetricFamily("rankwatch_step", "The training loop's own step number", labels=base)
            g.add_metric(lv, float(t.step if t.step is not None else t.steps))
            yield g
        c = CounterMetricFamily("rankwatch_probe_errors_total",
                                "Errors inside the probe (logged once per kind, never raised)", labels=base)
        c.add_metric(lv, t.errors)
        yield c


# Probes still open, closed on an uncaught exception (before any atexit handler, so that W&B's
# own exit handling has not finished the run yet).
_LIVE: weakref.WeakSet[Probe] = weakref.WeakSet()
_hook_installed = False
_atexit_installed = False


def _install_excepthook() -> None:
    global _hook_installed
    if _hook_installed:
        return
    _hook_installed = True
    previous = sys.excepthook

    def hook(exc_type: Any, exc: BaseException, tb: Any) -> None:
        for p in list(_LIVE):
            try:
                p.close(exc)
            except Exception:
                pass
        previous(exc_type, exc, tb)

    sys.excepthook = hook


def install_atexit() -> None:
    """Close live probes at interpreter exit (as completed, or failed with the uncaught
    exception). Called when a probe first binds a W&B run, i.e. after ``wandb.init``, so that
    it runs before wandb's own exit handler (atexit runs handlers last-in first-out)."""
    global _atexit_installed
    if _atexit_installed:
        return
    _atexit_installed = True
    atexit.register(_close_all_at_exit)


def _close_all_at_exit() -> None:
    exc = getattr(sys, "last_value", None)
    for p in list(_LIVE):
        try:
            p.close(exc)
        except Exception:
            pass
