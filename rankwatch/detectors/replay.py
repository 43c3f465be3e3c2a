"""Replay files: OpenMetrics text with timestamps, turned into a queryable Prometheus.

Design (measured in BENCHMARKS.md): rather than parse the file in Python (prometheus_client's
parser manages ~15 000 samples/s), promtool backfills it into a temporary TSDB and a temporary
Prometheus serves it; the detector then runs its live PromQL as range queries. Live and replay
agree by construction because they are the same expressions on the same engine.

promtool parses on one core; large files are cut at metric-family boundaries (kernel-side copy)
and backfilled by parallel promtool processes into one TSDB (overlapping blocks are fine since
Prometheus 2.39). promtool 2.42's messages carry no line numbers, so on failure the file is
scanned here to name the first bad line.

Samples out of order. promtool appends in batches of 5 000 samples, and what it does with a
sample that goes back in time depends on where it falls: inside the batch it is dropped without
a word, across a commit the whole file is refused ("out of order sample", no line), and the same
holds for a timestamp repeated with another value ("duplicate sample for timestamp"). So the
rule is rankwatch's, and said: within a series, a sample whose timestamp (at promtool's
millisecond resolution) is not after the series' last kept sample is dropped, as Prometheus
drops it on ingest, with a warning that gives the first such line and the count; a sample that
repeats its series' last timestamp with another value refuses the file, naming both lines
(which value is true cannot be known). Checking costs a clean file nothing but a line count
(``count_sample_lines``, while promtool runs): every sample line reached the TSDB, so none was
out of order. Only when promtool refused the file or loaded fewer samples does ``scan_samples``
read it; a refused file is then backfilled again from a copy without the dropped lines."""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import re
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
# OpenMetrics as promtool 2.42 reads it: no space inside a label set, none doubled between fields
# (the property tests hold this against promtool).
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
_LABELS = rf"\{{(?:{_LABEL}(?:,{_LABEL})*)?\}}"
_SAMPLE_RE = re.compile(rf"^({_NAME})({_LABELS})? (\S+)(?: (\S+))?(?: # .*)?$")
_META_RE = re.compile(rf"^# (HELP|TYPE|UNIT) ({_NAME})(?: (.*))?$")
_TYPES = {"counter", "gauge", "histogram", "gaugehistogram", "stateset", "info", "summary", "unknown"}


def _float_ok(s: str, finite: bool = False) -> bool:
    if "_" in s:  # Python reads 1_000, Go's ParseFloat does not
        return False
    try:
        x = float(s)
    except ValueError:
        return False
    return math.isfinite(x) or not finite


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
            if not _float_ok(m.group(4), finite=True):
                return lineno, f"timestamp {m.group(4)!r} is not a finite number"
    if lineno == 0:
        return 1, "file is empty"
    if not saw_eof:
        return lineno, "file does not end with '# EOF'"
    return None


@dataclass
class SampleScan:
    """What ``scan_samples`` found: sample lines, the ones dropped and why, or the conflict that
    refuses the file."""

    samples: int = 0
    back_in_time: int = 0  # timestamp before the series' last kept sample: dropped
    repeated: int = 0  # same timestamp and value as the series' last kept sample: dropped
    first_dropped: tuple[int, str] | None = None  # (line, why)
    conflict: tuple[int, int, str] | None = None  # (line, line of the earlier value, what)
    drop_lines: list[int] = field(default_factory=list)  # sorted

    @property
    def dropped(self) -> int:
        return self.back_in_time + self.repeated


def _lines(path: str | os.PathLike[str], chunk: int = 1 << 22) -> Iterator[tuple[list[bytes], bool]]:
    """The file's lines, a few MB at a time, without their newlines (the last piece of the file
    without a newline included), and whether a '#' appears there other than at a line start."""
    with open(path, "rb") as f:
        rest = b""
        while True:
            data = f.read(chunk)
            if not data:
                break
            data = rest + data
            inline_hash = data.count(b"#") != data.count(b"\n#") + (data[:1] == b"#")
            lines = data.split(b"\n")
            rest = lines.pop()
            yield lines, inline_hash
        if rest:
            yield [rest], b"#" in rest[1:]


_SERIES_RE = re.compile(rb"^(\S+?(?:\{.*\})?) (\S+) (\S+)(?: # .*)?$")


def _ms(ts: float) -> int:
    return int(ts * 1000)  # promtool: int64(ts * 1000), truncated


def scan_samples(path: str | os.PathLike[str]) -> SampleScan:
    """One pass over a replay file: per series (its text up to the value), is each sample after
    the last kept one? Lines this cannot read are left to promtool and ``find_first_error``.

    The speed matters (replay speed is a tracked figure): one ``rsplit``, one ``float`` and one
    dict look-up per sample; anything rare (a tie, a comment after the sample, a line that does
    not split cleanly) goes to a slower exact path."""
    scan = SampleScan()
    last: dict[bytes, float] = {}
    last_src: dict[bytes, bytes] = {}  # the kept line itself: no allocation, and its value for ties
    get = last.get
    drops = scan.drop_lines
    n = 0
    base = 1
    for lines, hashes in _lines(path):
        # without a '#' past a line start in the chunk, no sample has an exemplar or a '#' in a
        # label value: the per-line test for one is skipped
        for lineno, line in enumerate(lines, base):
            if not line or line[0] == 35:  # '#': metadata, EOF (an exemplar needs a sample first)
                continue
            parts = line.rsplit(b" ", 2)
            # the quick split is right unless a comment follows the sample or a label value holds
            # a space and a field is missing: then the exact (slower) pattern
            if len(parts) != 3 or (parts[0][-1] != 125 and b"{" in parts[0]) or (hashes and b"#" in line):
                m = _SERIES_RE.match(line)
                if m is None:
                    continue  # not a sample line: promtool refuses it and find_first_error names it
                parts = [m.group(1), m.group(2), m.group(3)]
            key = parts[0]
            try:
                t = float(parts[2])
            except ValueError:
                continue
            n += 1
            prev = get(key)
            if prev is not None and not t - prev >= 0.002:  # close, behind or NaN: as promtool sees it
                if not (math.isfinite(t) and math.isfinite(prev)):
                    continue  # promtool refuses such a timestamp; find_first_error names it
                tm, pm = _ms(t), _ms(prev)
                if tm <= pm:
                    if tm < pm:
                        scan.back_in_time += 1
                        why = f"goes back in time in its series ({t:.3f} after {prev:.3f})"
                    elif _same_value(last_src[key], parts[1]):
                        scan.repeated += 1
                        why = f"repeats its series' timestamp {t:.3f} with the same value"
                    else:
                        earlier = _line_number(path, last_src[key])
                        scan.conflict = (lineno, earlier,
                                         f"{key.decode('utf-8', 'replace')[:200]} has two different values at {t:.3f}")
                        scan.samples = n
                        return scan
                    if scan.first_dropped is None:
                        scan.first_dropped = (lineno, why)
                    drops.append(lineno)
                    continue
            last[key] = t
            last_src[key] = line
        base += len(lines)
    scan.samples = n
    return scan


def _line_number(path: str | os.PathLike[str], wanted: bytes) -> int:
    """The first line equal to ``wanted`` (rare: naming the earlier sample of a conflict)."""
    k = 0
    for lines, _ in _lines(path):
        for line in lines:
            k += 1
            if line == wanted:
                return k
    return 0


def _value(line: bytes) -> bytes:
    m = _SERIES_RE.match(line)
    return m.group(2) if m else line.rsplit(b" ", 2)[-2]


def _same_value(earlier_line: bytes, value: bytes) -> bool:
    old = _value(earlier_line)
    if old == value:
        return True
    try:
        a, b = float(old), float(value)
    except ValueError:
        return False
    return a == b or (math.isnan(a) and math.isnan(b))


def write_without(src: Path, dst: Path, drop_lines: list[int]) -> None:
    """Copy ``src`` to ``dst`` leaving out the (sorted, 1-based) ``drop_lines``."""
    drop = iter(drop_lines)
    nxt = next(drop, 0)
    lineno = 0
    with open(dst, "wb") as out:
        for lines, _ in _lines(src):
            keep = []
            for line in lines:
                lineno += 1
                if lineno == nxt:
                    nxt = next(drop, 0)
                    continue
                keep.append(line)
            out.write(b"\n".join(keep) + b"\n")


def count_sample_lines(path: str | os.PathLike[str], chunk: int = 1 << 26) -> int:
    """Lines that are not comments (every one a sample, else promtool refuses the file), counted
    with numpy over a memory map: ≈ 35 ms of CPU for 60 MB, a third of ``bytes.count``'s."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        a = np.frombuffer(mm, np.uint8)
        try:
            lines = int(a[-1] != 10)  # a last line without its newline
            comments = int(a[0] == 35)
            for lo in range(0, size, chunk):
                nl = np.flatnonzero(a[lo:lo + chunk] == 10) + (lo + 1)  # where each next line starts
                lines += len(nl)
                comments += int(np.count_nonzero(a[nl[nl < size]] == 35))
        finally:
            del a  # the map cannot close while numpy holds it
    return lines - comments


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


def _cpu_with_children() -> float:
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


class ReplayDataset:
    """A replay file made queryable: ``with ReplayDataset(path) as ds: ds.url``.

    ``timings`` holds ``backfill_s`` (split + promtool) and ``startup_s`` (Prometheus up);
    ``samples``, ``min_time`` and ``max_time`` come from the TSDB blocks' metadata."""

    def __init__(self, path: str | os.PathLike[str], *, workdir: str | os.PathLike[str] | None = None,
                 parts: int | None = None, check_order: bool = True) -> None:
        self.path = Path(path)
        self._workdir_arg = workdir
        self._parts = parts
        # False only for the benchmark's same-run comparison: promtool alone, as before the check
        self.check_order = check_order
        self.workdir: Path | None = None
        self.prometheus: promserver.ManagedProcess | None = None
        self.samples = 0
        self.min_time = math.nan
        self.max_time = math.nan
        self.timings: dict[str, float] = {}
        self.scan: SampleScan | None = None  # what the order check found, where it ran
        self.sample_lines = 0

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
            t0, cpu0 = time.perf_counter(), _cpu_with_children()
            tsdb = self.workdir / "tsdb"
            self._backfill(tsdb)
            self._read_meta(tsdb)
            t1, cpu1 = time.perf_counter(), _cpu_with_children()
            self.prometheus = promserver.start_prometheus(REPLAY_PROMETHEUS_CONFIG, workdir=self.workdir / "prom",
                                                          storage_dir=tsdb)
            t2 = time.perf_counter()
            # CPU (this process and its finished promtools): the benchmark's load-proof figure
            self.timings = {"backfill_s": t1 - t0, "startup_s": t2 - t1, "backfill_cpu_s": cpu1 - cpu0}
        except BaseException:
            self.close()
            raise

    def _start_promtool(self, pool: ThreadPoolExecutor, src: Path, tsdb: Path) -> list[Future[Any]]:
        """promtool on ``src`` (cut into parts for parallel processes), running in ``pool``."""
        assert self.workdir is not None
        tsdb.mkdir(parents=True)
        size = src.stat().st_size
        parts = self._parts or max(1, min(MAX_PARTS, os.cpu_count() or 1, size // SPLIT_MIN_BYTES))
        if parts == 1:
            inputs = [src]
        else:
            points = split_points(src, parts)
            inputs = []
            for k in range(len(points) - 1):
                dst = self.workdir / f"part{k}.om"
                _write_part(src, dst, points[k], points[k + 1], add_eof=True)
                inputs.append(dst)

        def run(part: Path) -> Any:
            try:
                return promserver.promtool("tsdb", "create-blocks-from", "openmetrics",
                                           f"--max-block-duration={MAX_BLOCK_DURATION}", str(part), str(tsdb),
                                           timeout=3600)
            finally:
                if part != src:
                    part.unlink(missing_ok=True)

        return [pool.submit(run, part) for part in inputs]

    def _backfill(self, tsdb: Path) -> None:
        """promtool into ``tsdb``, then the order check where something was lost or refused.

        A file whose every sample line reached the TSDB has nothing out of order (promtool drops
        or refuses every such sample), so the check costs a clean file one C-speed line count,
        run while promtool works; ``scan_samples`` reads the file only when promtool refused it
        or loaded fewer samples than it has lines."""
        assert self.workdir is not None
        with ThreadPoolExecutor(max_workers=MAX_PARTS) as pool:
            running = self._start_promtool(pool, self.path, tsdb)
            self.sample_lines = count_sample_lines(self.path) if self.check_order else 0
            results = [f.result() for f in running]
            failed = [r for r in results if r.returncode != 0]
            if not failed or not self.check_order:
                return self._raise_failed(failed)
            where = find_first_error(self.path)
            if where is not None:  # a syntax error: promtool's own words come along
                return self._raise_failed(failed, where)
            scan = self._scan()
            if not scan.dropped:
                return self._raise_failed(failed)
            # promtool refused a file whose late samples crossed one of its commits: the copy
            # without them is what the warning promised
            clean = self.workdir / "in-order.om"
            write_without(self.path, clean, scan.drop_lines)
            shutil.rmtree(tsdb)
            try:
                results = [f.result() for f in self._start_promtool(pool, clean, tsdb)]
            finally:
                clean.unlink(missing_ok=True)
        self._raise_failed([r for r in results if r.returncode != 0])

    def _scan(self) -> SampleScan:
        """The order check; raises for a conflicting duplicate, warns for dropped samples."""
        scan = self.scan = scan_samples(self.path)
        if scan.conflict is not None:
            line, earlier, what = scan.conflict
            raise InputError(f"{self.path}:{line}: {what} (the other at line {earlier}): the file is refused, "
                             "which value is true cannot be known; remove one of the two")
        if scan.first_dropped is not None:
            log.warning("%s:%d: %s: %d of %d samples do not advance their series' time and are dropped (%d going "
                        "back in time, %d repeating a timestamp with the same value), as Prometheus drops them on "
                        "ingest", self.path, scan.first_dropped[0], scan.first_dropped[1], scan.dropped,
                        scan.samples, scan.back_in_time, scan.repeated)
        return scan

    def _raise_failed(self, failed: list[Any], where: tuple[int, str] | None = None) -> None:
        if not failed:
            return
        message = (failed[0].stderr or failed[0].stdout).strip().splitlines()
        detail = message[-1] if message else f"exit code {failed[0].returncode}"
        where = where or find_first_error(self.path)
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
        if not self.check_order or self.samples == self.sample_lines:
            return
        # promtool dropped samples without a word: the check names them (it drops by the same
        # rule, in the same order, so the TSDB already holds what the warning says) or refuses
        scan = self.scan if self.scan is not None else self._scan()
        if self.samples != scan.samples - scan.dropped:
            # e.g. one series written with its labels in different orders: one series to
            # promtool, two to the check; say it rather than stay silent
            log.warning("%s: promtool loaded %d of its %d samples, %d less than the order check expected (series "
                        "written with their labels in different orders?)", self.path, self.samples, scan.samples,
                        scan.samples - scan.dropped - self.samples)

    def close(self) -> None:
        if self.prometheus is not None:
            self.prometheus.stop()
            self.prometheus = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
