"""W&B delivery: ``run.alert(title, text, level)`` and the detector's per-rank scores, written to
a **separate monitor run in the training run's group** of the training project.

Why not the training run itself: resuming a live run from a second process is unsupported
("unexpected results will occur if multiple processes use the same id concurrently"), and W&B's
shared mode is a public preview that needs the training run's id, a recent server, and is not
available offline. A monitor run (``job_type="rankwatch-monitor"``, ``group`` = the training
run's group) never touches the training process, shows next to the training run in the
project's group view, and its alerts reach the same Slack/e-mail channels the team set for
"scriptable run alerts". Its id is derived from the run label, so a restarted detector resumes
the same monitor run.

wandb falls back to the system temp directory, silently for us, when the directory it is given
cannot be written: the alert would be "delivered" into a /tmp that nobody reads (and, offline,
that ``wandb sync`` never finds). So the directory is checked by writing a file into it before
``wandb.init``, and a run that ended up anywhere else is refused: the alert stays pending with
an error naming the directory until it can be written.

This module imports wandb lazily: it costs about a second, and only a detector that is
configured for W&B pays it."""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from rankwatch.alerts.config import LinksConfig, WandbConfig
from rankwatch.alerts.delivery import DeliveryError
from rankwatch.alerts.lifecycle import IncidentView
from rankwatch.alerts.render import escape_mrkdwn, headline, render_plain, truncate
from rankwatch.secrets import redact

log = logging.getLogger(__name__)

LEVELS = {"critical": "ERROR", "warning": "WARN", "info": "INFO"}


def monitor_run_id(run_label: str) -> str:
    return "rankwatch-" + hashlib.sha256(run_label.encode()).hexdigest()[:12]


class WandbNotifier:
    name = "wandb"
    per_episode = False

    def __init__(self, cfg: WandbConfig, links: LinksConfig, state_dir: Path) -> None:
        self.cfg = cfg
        self.links = links
        # W&B's own setting wins, as for any wandb.init (`dir=` would override it otherwise).
        self.dir = Path(os.environ["WANDB_DIR"]) if os.environ.get("WANDB_DIR") else Path(state_dir) / "wandb"
        self._runs: dict[str, Any] = {}
        self._wandb: Any = None

    def wants(self, action: str) -> bool:
        return action in ("firing", "resolved", "reminder")

    def _module(self) -> Any:
        if self._wandb is None:
            import wandb

            self._wandb = wandb
        return self._wandb

    def run_for(self, label: str | None) -> Any:
        label = label or "unlabelled"
        run = self._runs.get(label)
        if run is not None:
            return run
        wandb = self._module()
        self._check_writable()
        # A detector launched from inside a training job's environment must not attach to that
        # job's W&B service process.
        os.environ.pop("WANDB_SERVICE", None)
        try:
            run = wandb.init(
                project=self.cfg.project, entity=self.cfg.entity, group=self.cfg.group or label,
                job_type="rankwatch-monitor", name=f"rankwatch-{label}", id=monitor_run_id(label), resume="allow",
                dir=str(self.dir), mode=self.cfg.mode, reinit="create_new",
                config={"rankwatch_monitor_of": label},
                settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
            )
        except Exception as exc:  # wandb raises many types (auth, network, usage)
            raise DeliveryError(redact(f"wandb.init failed: {type(exc).__name__}: {str(exc)[:200]}")) from None
        where = Path(run.dir).resolve()
        if not where.is_relative_to(self.dir.resolve()):
            # wandb fell back to another directory after all: nothing there is where it belongs.
            try:
                run.finish(exit_code=1)
            except Exception as exc:
                log.warning("wandb: finishing the misplaced run failed: %s", redact(str(exc)))
            raise DeliveryError(f"wandb wrote the run to {where} instead of {self.dir}: not delivered, kept pending")
        self._runs[label] = run
        return run

    def _check_writable(self) -> None:
        """Write a file into the W&B directory: os.access (what wandb checks) misses read-only
        mounts and root, and wandb then silently falls back to the system temp directory."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".rankwatch-write-check-", dir=self.dir)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise DeliveryError(f"W&B directory {self.dir} is not writable ({exc.strerror or type(exc).__name__}): "
                                "the alert stays pending until it is") from None

    def deliver(self, action: str, view: IncidentView, prior: dict[str, Any] | None, key: str) -> dict[str, Any]:
        run = self.run_for(view.run)
        wandb = self._module()
        # W&B forwards alerts to Slack: label text is escaped as for Slack's own messages.
        head = escape_mrkdwn(headline(view))
        if action == "resolved":
            title, level = f"Resolved #{view.id}: {head}", "INFO"
        elif action == "reminder":
            title, level = f"Still firing #{view.id}: {head}", LEVELS.get(view.severity, "WARN")
        else:
            title, level = f"#{view.id} {head}", LEVELS.get(view.severity, "WARN")
        title = truncate(title, 63)
        text = truncate(render_plain(view, action, self.links, escape=escape_mrkdwn), 8000)
        try:
            run.alert(title=title, text=text, level=getattr(wandb.AlertLevel, level),
                      wait_duration=self.cfg.wait_duration_s)
        except Exception as exc:
            raise DeliveryError(redact(f"wandb alert failed: {type(exc).__name__}: {str(exc)[:200]}")) from None
        return {"run_id": run.id, "title": title}

    def log_scores(self, run_label: str | None, data_time: float, scores: Mapping[Any, float]) -> None:
        """Per-rank detector scores, one history row per evaluation (x axis: data time)."""
        if not self.cfg.log_scores or not scores:
            return
        run = self.run_for(run_label)
        row: dict[str, Any] = {f"rankwatch/score/rank_{rank}": float(s) for rank, s in scores.items()}
        row["rankwatch/max_score"] = max(float(s) for s in scores.values())
        row["rankwatch/data_time"] = float(data_time)
        run.log(row)

    def close(self) -> None:
        for run in self._runs.values():
            try:
                run.finish()
            except Exception as exc:  # never fail the detector's shutdown
                log.warning("wandb: finishing the monitor run failed: %s", exc)
        self._runs.clear()


# -- reading an offline run back (tests, `rankwatch alerts wandb-offline`) ----------------------

_BLOCK = 32768
_HEADER = 7  # LevelDB log record header: crc32c (4), length (2), type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_transaction_log(path: str | Path) -> Iterator[Any]:
    """Records (``wandb_internal_pb2.Record``) of a ``run-<id>.wandb`` file. The file is W&B's
    7-byte header (":W&B", magic, version) followed by a LevelDB-style log of 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log")
    pos, pending = 7, b""
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - (pos % _BLOCK)
        if left_in_block < _HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, rtype = struct.unpack("<IHB", data[pos:pos + _HEADER])
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if rtype == 0 and length == 0:
            break
        if rtype == _FULL:
            pending = b""
            yield _parse(wandb_internal_pb2, chunk)
        elif rtype == _FIRST:
            pending = chunk
        elif rtype == _MIDDLE:
            pending += chunk
        elif rtype == _LAST:
            yield _parse(wandb_internal_pb2, pending + chunk)
            pending = b""


def _parse(pb2: Any, raw: bytes) -> Any:
    rec = pb2.Record()
    rec.ParseFromString(raw)
    return rec


def _run_logs(wandb_dir: str | Path) -> list[Path]:
    """Each offline run's transaction log once, oldest first: W&B links ``latest-run`` to the
    newest run directory, so the same log can be reached under two names."""
    logs: dict[Path, Path] = {}
    for f in Path(wandb_dir).rglob("run-*.wandb"):
        logs.setdefault(f.resolve(), f)
    return sorted(logs.values(), key=lambda p: p.stat().st_mtime)


def offline_alerts(wandb_dir: str | Path) -> list[dict[str, Any]]:
    """Every alert recorded by offline runs under ``wandb_dir`` (oldest run first)."""
    out = []
    for f in _run_logs(wandb_dir):
        run_id = f.stem[len("run-"):]
        for rec in read_transaction_log(f):
            if rec.WhichOneof("record_type") == "alert":
                out.append({"run_id": run_id, "title": rec.alert.title, "text": rec.alert.text,
                            "level": rec.alert.level, "wait_duration_ms": rec.alert.wait_duration})
    return out


def offline_history(wandb_dir: str | Path) -> list[dict[str, Any]]:
    """History rows (``run.log``) recorded by offline runs under ``wandb_dir``."""
    import json

    rows = []
    for f in _run_logs(wandb_dir):
        for rec in read_transaction_log(f):
            if rec.WhichOneof("record_type") == "history":
                row = {}
                for item in rec.history.item:
                    k = item.key or "/".join(item.nested_key)
                    row[k] = json.loads(item.value_json) if item.value_json else None
                rows.append(row)
    return rows
