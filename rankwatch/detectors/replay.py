"""Replay files: OpenMetrics text with timestamps, turned into a queryable Prometheus.

Design (measured in BENCHMARKS.md): rather than parse the file in Python (prometheus_client's
parser manages ~15 000 samples/s), promtool backfills it into a temporary TSDB and a temporary
Prometheus serves it; the detector then runs its live PromQL as range queries. Live and replay
agree by construction because they are the same expressions on the same engine.

promtool parses on one core; large files are cut at metric-family boundaries (kernel-side copy)
and backfilled by parallel promtool processes into one TSDB (overlapping blocks are fine since
Prometheus 2.39). promtool 2.42's messages carry no line numbers, so on failure the file is
scanned here to name the first bad line."""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rankwatch import promserver
from rankwatch.errors import InputError, RankwatchError

log = logging.getLogger(__name__)

# Below this size a split does not pay for the extra promtool start-up.
SPLIT_MIN_BYTES = 8 * 1024 * 1024
MAX_PARTS = 4
# promtool re-reads the whole file once per block: large blocks mean one pass for most files.
MAX_BLOCK_DURATION = "1000h"
REPLAY_PROMETHEUS_CONFIG = "global:\n  scrape_interval: 1h\n"  # scrapes nothing

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABELS = r'\{(?:\s*[a-zA-Z_][a-zA-Z0-9_]*\s*=\s*"(?:[^"\\\n]|\\.)*"\s*,?)*\s*\}'
_SAMPLE_RE = re.compile(rf"^({_NAME})({_LABELS})?\s+(\S+)(?:\s+(\S+))?(?:\s+#\s.*)?$")
_META_RE = re.compile(rf"^# (HELP|TYPE|UNIT) ({_NAME})(?: (.*))?$")
_TYPES = {"counter", "gauge", "histogram", "gaugehistogram", "stateset", "info", "summary", "unknown"}


def _float_ok(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def find_first_error(path: str | os.PathLike[str]) -> tuple[int, str] | None:
    """(line number, reason) of the first line promtool's OpenMetrics parser would reject, or
    None. Only run after promtool failed: a plain Python scan, about a second per 40 MB."""
    lineno = 0
    saw_eof = False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\n")
            except UnicodeDecodeError:
                return lineno, "not valid UTF-8"
            if saw_eof:
                return lineno, "content after '# EOF' (it must be the last line)"
            if line == "# EOF":
                saw_eof = True
                continue
            if line.startswith("#"):
                m = _META_RE.match(line)
                if not m:
                    return lineno, f"invalid comment line {line[:80]!r} (expected # HELP, # TYPE, # UNIT or # EOF)"
                if m.group(1) == "TYPE" and (m.group(3) or "") not in _TYPES:
                    return lineno, f"unknown metric type {m.group(3)!r}"
                continue
            if not line.strip():
                return lineno, "empty line (OpenMetrics allows none)"
            m = _SAMPLE_RE.match(line)
            if not m:
                return lineno, f"not a sample line: {line[:80]!r}"
            if not _float_ok(m.group(3)):
                return lineno, f"value {m.group(3)!r} is not a number"
            if m.group(4) is None:
                return lineno, "sample has no timestamp (replay files need one on every sample)"
            if not _float_ok(m.group(4)):
                return lineno, f"timestamp {m.group(4)!r} is not a number"
    if lineno == 0:
        return 1, "file is empty"
    if not saw_eof:
        return lineno, "file does not end with '# EOF'"
    return None


def split_points(path: Path, parts: int) -> list[int]:
    """Byte offsets that cut the file into ``parts`` pieces, each starting at the metadata of a
    metric family (a "# HELP/TYPE/UNIT" line) or, failing that, at a line start."""
    size = path.stat().st_size
    points = [0]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        eof = mm.rfind(b"# EOF")
        end = eof if eof >= 0 else size
        for k in range(1, parts):
            pos = max(points[-1] + 1, end * k // parts)
            cut = -1
            p = pos
            while True:
                p = mm.find(b"\n# ", p, end)
                if p < 0:
                    break
                if mm[p + 3:p + 8] in (b"HELP ", b"TYPE ", b"UNIT "):
                    cut = p + 1
                    # back to the first metadata line of this family's block (TYPE before HELP)
                    while cut > 0:
                        prev = mm.rfind(b"\n", 0, cut - 1) + 1
                        if mm[prev:prev + 7] not in (b"# HELP ", b"# TYPE ", b"# UNIT "):
                            break
                        cut = prev
                    break
                p += 1
            if cut < 0:
                nl = mm.find(b"\n", pos, end)
                cut = nl + 1 if nl >= 0 else -1
            if cut <= points[-1] or cut >= end:
                break
            points.append(cut)
        points.append(end)
    return points


def _write_part(src: Path, dst: Path, start: int, stop: int, add_eof: bool) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        remaining, offset = stop - start, start
        while remaining > 0:
            n = os.copy_file_range(fin.fileno(), fout.fileno(), remaining, offset)
            if n == 0:
                break
            offset += n
            remaining -= n
        if add_eof:
            fout.write(b"# EOF\n")


class ReplayDataset:
    """A replay file made queryable: ``with ReplayDataset(path) as ds: ds.url``.

    ``timings`` holds ``backfill_s`` (split + promtool) and ``startup_s`` (Prometheus up);
    ``samples``, ``min_time`` and ``max_time`` come from the TSDB blocks' metadata."""

    def __init__(self, path: str | os.PathLike[str], *, workdir: str | os.PathLike[str] | None = None,
                 parts: int | None = None) -> None:
        self.path = Path(path)
        self._workdir_arg = workdir
        self._parts = parts
        self.workdir: Path | None = None
        self.prometheus: promserver.ManagedProcess | None = None
        self.samples = 0
        self.min_time = math.nan
        self.max_time = math.nan
        self.timings: dict[str, float] = {}

    @property
    def url(self) -> str:
        if self.prometheus is None:
            raise RankwatchError("replay dataset is not open")
        return self.prometheus.url

    def __enter__(self) -> ReplayDataset:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such replay file")
        if self.path.stat().st_size == 0:
            raise InputError(f"{self.path}:1: file is empty")
        self.workdir = Path(tempfile.mkdtemp(prefix="rankwatch-replay-", dir=self._workdir_arg))
        try:
            t0 = time.perf_counter()
            tsdb = self.workdir / "tsdb"
            self._backfill(tsdb)
            self._read_meta(tsdb)
            t1 = time.perf_counter()
            self.prometheus = promserver.start_prometheus(REPLAY_PROMETHEUS_CONFIG, workdir=self.workdir / "prom",
                                                          storage_dir=tsdb)
            t2 = time.perf_counter()
            self.timings = {"backfill_s": t1 - t0, "startup_s": t2 - t1}
        except BaseException:
            self.close()
            raise

    def _backfill(self, tsdb: Path) -> None:
        tsdb.mkdir(parents=True)
        size = self.path.stat().st_size
        parts = self._parts or max(1, min(MAX_PARTS, os.cpu_count() or 1, size // SPLIT_MIN_BYTES))
        assert self.workdir is not None
        if parts == 1:
            inputs = [self.path]
        else:
            points = split_points(self.path, parts)
            inputs = []
            for k in range(len(points) - 1):
                dst = self.workdir / f"part{k}.om"
                _write_part(self.path, dst, points[k], points[k + 1], add_eof=True)
                inputs.append(dst)
        with ThreadPoolExecutor(max_workers=len(inputs)) as pool:
            results = list(pool.map(lambda p: promserver.promtool(
                "tsdb", "create-blocks-from", "openmetrics", f"--max-block-duration={MAX_BLOCK_DURATION}",
                str(p), str(tsdb), timeout=3600), inputs))
        for p in inputs:
            if p != self.path:
                p.unlink(missing_ok=True)
        failed = [r for r in results if r.returncode != 0]
        if failed:
            message = (failed[0].stderr or failed[0].stdout).strip().splitlines()
            detail = message[-1] if message else f"exit code {failed[0].returncode}"
            where = find_first_error(self.path)
            if where is not None:
                raise InputError(f"{self.path}:{where[0]}: {where[1]} (promtool: {detail})")
            raise InputError(f"{self.path}: promtool could not read it as OpenMetrics: {detail}")

    def _read_meta(self, tsdb: Path) -> None:
        mins, maxs = [], []
        for meta in tsdb.glob("*/meta.json"):
            m = json.loads(meta.read_text())
            mins.append(m["minTime"])
            maxs.append(m["maxTime"])
            self.samples += int(m.get("stats", {}).get("numSamples", 0))
        if not mins or self.samples == 0:
            raise InputError(f"{self.path}: no samples with timestamps found")
        self.min_time = min(mins) / 1000.0
        self.max_time = (max(maxs) - 1) / 1000.0  # a block's maxTime is exclusive

    def close(self) -> None:
        if self.prometheus is not None:
            self.prometheus.stop()
            self.prometheus = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
