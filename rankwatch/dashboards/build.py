"""Render every dashboard to its committed JSON file, and check that the committed files are
current (`make dashboards` writes them; the tests fail when they are stale)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from grafanalib.core import Dashboard

from rankwatch.dashboards import efa_network, gpu_health, node, training_run
from rankwatch.dashboards.common import dumps, render

BUILDERS: dict[str, Callable[[], Dashboard]] = {
    "training-run.json": training_run.build,
    "gpu-health.json": gpu_health.build,
    "efa-network.json": efa_network.build,
    "node.json": node.build,
}


def render_all() -> dict[str, dict[str, Any]]:
    """File name → dashboard JSON data, in a stable order."""
    return {name: render(build()) for name, build in BUILDERS.items()}


def write_files(files: dict[str, str], out_dir: Path) -> list[Path]:
    """Write ``files`` under ``out_dir``; only files whose text changed are rewritten."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = out_dir / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    return written


def stale_files(files: dict[str, str], out_dir: Path) -> list[str]:
    """Names in ``files`` whose copy under ``out_dir`` is missing or differs."""
    return [name for name, text in files.items()
            if not (out_dir / name).exists() or (out_dir / name).read_text() != text]


def dashboard_files() -> dict[str, str]:
    return {name: dumps(data) for name, data in render_all().items()}
