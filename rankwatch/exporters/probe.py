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
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from rankwatch.exporters.cuda_timing import CudaSectionTimer
from rankwatch.exporters.exposition import label_text
from rankwatch.exporters.identity import RankIdentity
from rankwatch.httpserver import HttpServer, Limits

log = logging.getLogger("rankwatch.probe")

DEFAULT_BASE_PORT = 9420
SECTION_NAMES = ("dataloader", "forward", "backward", "optimizer", "comm", "checkpoint")
SERIES_LABELS = ("run", "rank", "local_rank", "node")
CLOSE_DRAIN_SECONDS = 2.0
# One Prometheus (two with HA) scrapes a rank: two workers, and few idle connections kept.
SERVER_LIMITS = Limits(workers=2, max_connections=64)


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
    ``addr``: the address to listen on; default ``$RANKWATCH_PROBE_ADDR``, else ``0.0.0.0``.
    ``identity``: default :meth:`RankIdentity.from_env`. ``wandb_run``: a wandb run to report
    to; default: ``wandb.run`` on rank 0 if the script started one; ``None`` disables W&B.
    ``wandb_every``: steps between W&B reports. ``wandb_gather``: every ``wandb_every`` steps
    gather each rank's section means to rank 0 (a collective over a gloo group: pass the same
    value on every rank) so that rank 0 can log the cross-rank spread. ``cuda_timing``: ``None``
    (default) uses CUDA events once the script has initialised CUDA; ``False`` never.
    ``max_sections``: bound on distinct section names (each is a label value).
    """

    def __init__(self, run: str, *, port: int | None = None, addr: str | None = None,
                 identity: RankIdentity | None = None, wandb_run: Any = AUTO, wandb_every: int = 100,
                 wandb_gather: bool = False, cuda_timing: bool | None = None, max_sections: int = 32) -> None:
        if not isinstance(run, str) or not run:
            raise ValueError("Probe(run=...) needs a non-empty training run id")
        if wandb_every < 1:
            raise ValueError(f"wandb_every must be >= 1, got {wandb_every}")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
            raise ValueError(f"Probe(port={port!r}): a port is an int from 0 to 65535 (0: do not serve)")
        self.run = run
        self.identity = identity if identity is not None else RankIdentity.from_env()
        self._identity_auto = identity is None
        ident = self.identity
        # Label values must be text: a run id or node name with bytes that are not UTF-8 (an
        # environment variable decoded with surrogates) would fail every scrape.
        self._labels = tuple(label_text(v) for v in (run, str(ident.rank), str(ident.local_rank), ident.node))
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

        self._httpd: HttpServer | None = None
        self.port: int | None = None
        # every interface by default (Prometheus scrapes from another host); RANKWATCH_PROBE_ADDR
        # narrows it without touching the training script
        self._serve(self._resolve_port(port), addr or os.environ.get("RANKWATCH_PROBE_ADDR") or "0.0.0.0")

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
        ended (default now).

        Counters only rise: a time that is not a finite number >= 0, or a token count that is
        not a whole number >= 0, is rejected and counted in ``rankwatch_probe_errors_total``
        (logged once per kind). A rejected step time drops the whole step; a rejected section
        or token count drops only that value."""
        try:
            secs = _seconds(seconds)
            good: dict[str, float] = {}
            for name, sec in (sections or {}).items():
                value = _seconds(sec)
                if value is None:
                    self._reject("section-seconds", f"section {name!r} = {sec!r}")
                else:
                    good[name] = value
            if secs is None:
                self._reject("step-seconds", f"step time {seconds!r} (the step is not recorded)")
                if tokens is not None and _count(tokens) is None:
                    self._reject("tokens", f"tokens = {tokens!r}")
                return
            if good:
                with self._lock:
                    for name, value in good.items():
                        self._add_section_locked(name, value)
            self._end_step(secs, tokens, step, end_time)
        except Exception as exc:
            self._fail("record_step", exc)

    def record_section(self, name: str, seconds: float) -> None:
        """Record one section measured elsewhere (host time; it is not tied to a step). A time
        that is not a finite number >= 0 is rejected and counted, as in :meth:`record_step`."""
        value = _seconds(seconds)
        if value is None:
            self._reject("section-seconds", f"section {name!r} = {seconds!r}")
            return
        self._end_section(name, value, None)

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

    def _end_step(self, seconds: float, tokens: Any, step: Any, end_time: Any) -> None:
        try:
            n_tokens = 0
            if tokens is not None:
                if type(tokens) is int and tokens >= 0:  # the common case, without a call
                    n_tokens = tokens
                else:
                    checked = _count(tokens)
                    if checked is None:
                        self._reject("tokens", f"tokens = {tokens!r} (not counted)")
                    else:
                        n_tokens = checked
            loop_step = None
            if step is not None:
                loop_step = _step_number(step)
                if loop_step is None:
                    self._reject("step-number", f"step = {step!r} (not exported)")
            now = time.time()
            if end_time is not None:
                if isinstance(end_time, (int, float)) and 0 < end_time < math.inf:
                    now = float(end_time)
                else:
                    self._reject("end-time", f"end_time = {end_time!r} (the current time is used)")
            with self._lock:
                self._steps += 1
                self._step_seconds += seconds
                self._tokens += n_tokens
                self._last_step_time = now
                self._loop_step = self._steps if loop_step is None else loop_step
                steps = self._steps
            if self._cuda is not None:
                self._drain_cuda()
            if self._reporter is not None:
                self._reporter.on_step(steps)
        except Exception as exc:
            self._fail("step", exc)

    def _reject(self, where: str, what: str) -> None:
        self._fail(where, ValueError(f"rejected {what}: a counter only rises, so times must be finite "
                                     "numbers >= 0 and token counts whole numbers >= 0"))

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
                    if not 0.0 <= sec < math.inf:  # a GPU timing that makes no sense: never into a counter
                        self._fail_locked("cuda-time", ValueError(f"rejected CUDA time {sec!r} of section {name!r}"))
                        continue
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

    def _resolve_port(self, port: int | None) -> int | None:
        """The port to serve on: 0 for none; None when the environment asks for an impossible
        one (warned about and counted: a typo in a launcher script must not stop training)."""
        if port is not None:
            return int(port)  # checked in __init__
        raw = os.environ.get("RANKWATCH_PROBE_BASE_PORT", "").strip()
        if not raw:
            base = DEFAULT_BASE_PORT
        elif raw.isascii() and raw.isdigit():
            base = int(raw)
        else:
            return self._bad_port(f"RANKWATCH_PROBE_BASE_PORT={raw!r} is not a port number")
        if base == 0:
            return 0
        port = base + self.identity.local_rank
        if not 0 < port <= 65535:
            return self._bad_port(f"RANKWATCH_PROBE_BASE_PORT={raw} + LOCAL_RANK={self.identity.local_rank} "
                                  f"= {port} is not a port (1-65535)")
        return port

    def _bad_port(self, why: str) -> None:
        with self._lock:
            self._errors += 1
        log.warning("rankwatch probe (run %s, rank %s): %s; recording continues without a metrics endpoint "
                    "(rankwatch_probe_errors_total counts this). Set RANKWATCH_PROBE_BASE_PORT so that "
                    "base + LOCAL_RANK stays within 1-65535.", self.run, self.identity.rank, why)
        return None

    def _serve(self, port: int | None, addr: str) -> None:
        if not port:
            return
        try:
            self._httpd = HttpServer(addr, port, _ProbeHandler, limits=SERVER_LIMITS, name="rankwatch-probe")
        except (OSError, OverflowError, ValueError) as exc:
            # Another process (a second job on the node, a leftover rank) holds the port, or the
            # address does not resolve: the job must go on; its timings are still recorded, and
            # W&B still gets them.
            with self._lock:
                self._errors += 1
            log.warning("rankwatch probe (run %s, rank %s): cannot serve metrics on %s:%d (%s); "
                        "recording continues without an endpoint. Set RANKWATCH_PROBE_BASE_PORT or "
                        "Probe(port=...) to use another port.", self.run, self.identity.rank, addr, port,
                        getattr(exc, "strerror", None) or exc)
            return
        self._httpd.registry = self.registry
        self.port = self._httpd.port

    def _stop_serving(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            try:
                httpd.stop()
            except Exception as exc:
                self._fail("serve-stop", exc)

    def _setup_reporter(self, wandb_run: Any, every: int, gather: bool) -> None:
        explicit = wandb_run is not AUTO
        if not explicit and not gather and self.identity.rank != 0:
            return
        from rankwatch.integrations.wandb_reporter import WandbReporter

        self._reporter = WandbReporter(self, wandb_run if explicit else None, every=every,
                                       gather=gather, auto=not explicit)


def _seconds(value: Any) -> float | None:
    """A duration that may go into a counter: a finite number >= 0, else None."""
    if isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if 0.0 <= v < math.inf else None  # NaN fails every comparison


def _count(value: Any) -> int | None:
    """A token count: a whole number >= 0 (an int, or a float / numpy / torch scalar holding
    one), else None."""
    return _whole(value, minimum=0)


def _step_number(value: Any) -> int | None:
    """The loop's step number (a gauge: it may go back after a restart), if it is a whole number."""
    return _whole(value, minimum=-math.inf)


def _whole(value: Any, minimum: float) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= minimum else None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return int(v) if math.isfinite(v) and v >= minimum and v == int(v) else None


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
        g.add_metric(lv + [label_text(str(v)) for v in info.values()], 1.0)
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
        sections: dict[str, tuple[float, int]] = {}
        for name, (s, n) in t.sections.items():
            # a section name is a label value: text only (two names differing only in bytes
            # that are not text are summed rather than served as one series twice)
            key = label_text(name)
            old = sections.get(key, (0.0, 0))
            sections[key] = (old[0] + s, old[1] + n)
        for name, (s, n) in sorted(sections.items()):
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


class _ProbeHandler(BaseHTTPRequestHandler):
    """Serves the probe's registry on every path, as prometheus_client's server did: text
    format 0.0.4, or OpenMetrics when the scraper asks for it. Never gzipped: the body is a
    few KB, and compressing it would hold the training process's GIL for longer."""

    server: Any  # the HttpServer, with .registry attached
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
        try:
            body, status = encoder(self.server.registry), 200
        except Exception as exc:  # never let a scrape take the probe down
            log.warning("rankwatch probe: scrape failed: %s", exc)
            body, status, ctype = f"scrape failed: {type(exc).__name__}\n".encode(), 500, "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # scrapes are not worth a line in the training log


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
