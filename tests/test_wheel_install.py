"""rankwatch installed from its wheel, outside any checkout: the commands that need the alert
rules, dashboards and examples find the copies inside the package, and produce real output.

The wheel is built from a copy of this checkout (as `pip wheel .` on a fresh clone would),
installed with ``--no-deps`` into a fresh venv in a temporary directory, and its third-party
dependencies come from this project's venv through a ``.pth`` path entry. Such an entry adds
only that one directory: the ``.pth`` files inside it (among them the editable install that
points at this checkout) are not run, so nothing can import rankwatch from the checkout. The
test proves it: ``rankwatch.__file__`` is inside the new venv. Everything runs with the new
venv's console script, from an empty working directory, with no PYTHONPATH."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from rankwatch import promserver

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# What a fresh clone has (its untracked build and cache directories are not part of it).
NOT_IN_A_CLONE = (".venv", ".git", "__pycache__", "build", "dist", "*.egg-info", ".pytest_cache", ".ruff_cache",
                  "demo-report", "wandb", ".tmp")


@dataclass
class Installed:
    venv: Path
    site: Path
    cwd: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.venv / "bin" / "rankwatch"), *args], cwd=self.cwd, env=self.env,
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(*NOT_IN_A_CLONE))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # No build isolation and no index: offline, with the setuptools of this venv.
    res = subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                          "-w", str(root / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    wheels = list((root / "dist").glob("rankwatch-*.whl"))
    assert len(wheels) == 1, wheels
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    res = subprocess.run([*pip, "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheels[0])],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "rankwatch_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    shutil.rmtree(src)  # nothing of the checkout's copy may be used from here on
    cwd = root / "work"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    yield Installed(venv, site, cwd, env)


def test_rankwatch_is_imported_from_the_new_venv_not_the_checkout(installed: Installed) -> None:
    res = subprocess.run([str(installed.venv / "bin" / "python"), "-c",
                          "import rankwatch, rankwatch.demo.runner as r; print(rankwatch.__file__); print(r.PACKAGE_PARENT)"],
                         cwd=installed.cwd, env=installed.env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    module, package_parent = res.stdout.splitlines()
    assert Path(module).resolve().is_relative_to(installed.site.resolve()), module
    assert not Path(module).resolve().is_relative_to(REPO)
    # the demo's children import the same copy
    assert Path(package_parent) == installed.site.resolve()


def test_assets_are_the_packaged_copies(installed: Installed) -> None:
    res = installed.run("assets")
    assert res.returncode == 0, res.stderr
    paths = dict(line.split("\t") for line in res.stdout.splitlines())
    assert set(paths) == {"alerts", "runbooks", "dashboards", "examples"}
    for name, path in paths.items():
        p = Path(path)
        assert p.resolve().is_relative_to(installed.site.resolve()) and p.is_dir(), (name, path)
    assert sorted(p.name for p in Path(paths["alerts"]).glob("rankwatch-*.yml")) == \
        sorted(p.name for p in (REPO / "alerts").glob("rankwatch-*.yml"))
    assert (Path(paths["examples"]) / "detector.toml").read_text() == (REPO / "examples" / "detector.toml").read_text()
    assert {p.name for p in Path(paths["runbooks"]).glob("*.md")} == {p.name for p in (REPO / "docs/runbooks").glob("*.md")}


def test_node_exporter_simulate_serves_gpu_and_efa_metrics(installed: Installed) -> None:
    port = promserver.free_port()
    log = (installed.cwd / "node-exporter.log").open("w")
    proc = subprocess.Popen([str(installed.venv / "bin" / "rankwatch"), "node-exporter", "--simulate",
                             "--web.listen-address", f"127.0.0.1:{port}", "--hostname", "p5-wheel"],
                            cwd=installed.cwd, env=installed.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        promserver.wait_http_ok(f"http://127.0.0.1:{port}/healthz", proc=proc)
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=60).text
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    temps = fams["DCGM_FI_DEV_GPU_TEMP"].samples
    assert len(temps) == 8 and {s.labels["Hostname"] for s in temps} == {"p5-wheel"}
    assert len({s.labels["device"] for s in fams["node_amazonefa_tx_bytes"].samples}) == 32
    assert fams["rankwatch_node_info"].samples[0].labels["Hostname"] == "p5-wheel"


def test_dashboards_and_the_prometheus_rule_come_from_the_package(installed: Installed) -> None:
    res = installed.run("dashboards", "generate", "--kubernetes-out", "k8s")
    assert res.returncode == 0, res.stderr
    dashboards = sorted((installed.cwd / "dashboards").glob("*.json"))
    assert [p.name for p in dashboards] == sorted(p.name for p in (REPO / "dashboards").glob("*.json"))
    for p in dashboards:
        assert json.loads(p.read_text())["panels"], p
    rule = yaml.safe_load((installed.cwd / "k8s" / "prometheusrule.yaml").read_text())
    shipped = [g for p in sorted((REPO / "alerts").glob("rankwatch-*.yml"))
               for g in yaml.safe_load(p.read_text())["groups"]]
    assert rule["kind"] == "PrometheusRule" and rule["spec"]["groups"] == shipped
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert {"RankwatchGpuLost", "RankwatchTrainingHang", "RankwatchEfaErrorsRising"} <= alerts


def test_rule_generation_from_a_directory_without_rules_is_an_error(installed: Installed) -> None:
    (installed.cwd / "empty-alerts").mkdir()
    res = installed.run("dashboards", "generate", "--out", "d2", "--kubernetes-out", "k8s-empty",
                        "--alerts", "empty-alerts")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("rankwatch: error: no Prometheus rule files")
    assert "Traceback" not in res.stderr
    assert not (installed.cwd / "k8s-empty" / "prometheusrule.yaml").exists()


def test_detect_replays_a_simulated_straggler(installed: Installed) -> None:
    res = installed.run("sim", "scenario", "slowdown", "--layout", "2x2x2", "--gpus-per-node", "4",
                        "--duration", "600", "--onset", "200", "--magnitude", "0.3", "--name", "slow")
    assert res.returncode == 0, res.stderr
    truth = json.loads((installed.cwd / "slow.truth.json").read_text())["faults"][0]
    res = installed.run("detect", "--replay", "slow.om")
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    strag = [(e["state"], e["rank"]) for e in events if e["kind"] == "straggler"]
    assert strag and strag[0] == ("firing", truth["rank"])
    assert all(rank == truth["rank"] for _, rank in strag)
