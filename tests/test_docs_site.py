"""The docs build as a site with `mkdocs build --strict`: a broken link or anchor fails the
suite, and files outside docs/ that the docs link to (BENCHMARKS.md, alerts/*.yml,
examples/detector.toml) are in the site rather than broken."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOOK = REPO / "docs_hooks" / "repo_files.py"


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=300, cwd=config.parent)


def test_docs_site_builds_strictly(tmp_path: Path) -> None:
    site = tmp_path / "site"
    res = _build(REPO / "mkdocs.yml", site)
    assert res.returncode == 0, res.stdout + res.stderr
    for page in ("index", "demo", "architecture", "node-exporter", "probe", "megatron", "detector", "alerting",
                 "dashboards", "deployment", "amp", "security", "sizing", "development"):
        assert (site / page / "index.html").is_file() if page != "index" else (site / "index.html").is_file(), page
    assert "Not written yet" in (site / "sizing" / "index.html").read_text()
    # Files outside docs/ that the pages link to are part of the site, byte for byte.
    for rel in ("alerts/rankwatch-alerts.yml", "alerts/alertmanager.yml", "examples/detector.toml"):
        assert (site / "repo" / rel).read_bytes() == (REPO / rel).read_bytes(), rel
    assert (site / "repo" / "BENCHMARKS" / "index.html").is_file()
    # The quickstart is the README itself, its links pointing into the site.
    quickstart = (site / "repo" / "index.html").read_text()
    assert "make demo" in quickstart and 'href="../demo/"' in quickstart
    # Every runbook is listed in the generated runbooks index.
    index = (site / "runbooks" / "index.html").read_text()
    for runbook in (REPO / "docs" / "runbooks").glob("*.md"):
        assert f'href="{runbook.stem}/"' in index, runbook.name
    nav = (site / "index.html").read_text()
    for title in ("Demo", "Quickstart", "Architecture", "Node exporter", "Step probe", "Megatron-LM", "Detector",
                  "Alerting", "Runbooks", "Dashboards", "Compose, Kubernetes, Slurm / HyperPod",
                  "AMP and Grafana alerting", "Security and failure modes", "Sizing", "Development", "Benchmarks"):
        assert f">{title}<" in nav, title


def _mini_site(tmp_path: Path, page: str) -> Path:
    (tmp_path / "docs").mkdir(parents=True)
    (tmp_path / "docs" / "index.md").write_text(page)
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## Part two\n")
    (tmp_path / "present.yml").write_text("groups: []\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text(f"site_name: t\ndocs_dir: docs\ntheme: {{name: mkdocs, highlightjs: false}}\n"
                      f"hooks: ['{HOOK}']\nvalidation: {{links: {{anchors: warn, unrecognized_links: warn}}}}\n")
    return config


def test_a_broken_link_or_anchor_fails_the_build(tmp_path: Path) -> None:
    ok = _mini_site(tmp_path / "ok", "# T\n\n[rules](../present.yml), [part](other.md#part-two)\n")
    res = _build(ok, tmp_path / "ok" / "site")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "ok" / "site" / "repo" / "present.yml").is_file()
    for broken, named in (("[gone](../missing.yml)", "missing.yml"), ("[gone](other.md#no-such-part)", "no-such-part"),
                          ("[gone](nope.md)", "nope.md")):
        config = _mini_site(tmp_path / named, f"# T\n\n[rules](../present.yml) {broken}\n")
        res = _build(config, tmp_path / named / "site")
        assert res.returncode != 0 and named in res.stdout + res.stderr, res.stdout + res.stderr
