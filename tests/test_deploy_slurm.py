"""deploy/slurm: the Prolog/Epilog on a fake Slurm environment write exactly the files the node
exporter (job mapping directory) and Prometheus (file_sd targets) read — checked with the
exporter's own reader and a real promtool/Prometheus — and never fail the job; the systemd
units are hardened and start real rankwatch commands."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml
from conftest import wait_until

from rankwatch import promserver
from rankwatch.cli import build_parser
from rankwatch.exporters.gpu import read_job_mapping

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "deploy" / "slurm"


def _run(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "RANKWATCH_JOB_MAPPING_DIR": str(tmp_path / "map"),
            "RANKWATCH_FILE_SD_DIR": str(tmp_path / "sd"), "SLURMD_NODENAME": "p5-007"}
    return subprocess.run(["bash", str(SLURM / script)], env={**base, **env}, capture_output=True, text=True,
                          timeout=300)


def _prometheus_config(sd_dir: Path) -> str:
    """deploy/slurm/prometheus-amp.yml with its probe file_sd pointed at ``sd_dir``."""
    cfg = yaml.safe_load((SLURM / "prometheus-amp.yml").read_text())
    for job in cfg["scrape_configs"]:
        if job["job_name"] == "rankwatch-probe":
            job["file_sd_configs"][0]["files"] = [str(sd_dir / "probes-*.json")]
            job["file_sd_configs"][0]["refresh_interval"] = "1s"
    cfg["rule_files"] = []
    return yaml.safe_dump(cfg)


def test_prolog_and_epilog_maintain_mapping_and_targets(tmp_path: Path) -> None:
    first = _run("prolog.sh", tmp_path, SLURM_JOB_ID="4242", SLURM_JOB_GPUS="0,1,3", SLURM_JOB_PARTITION="train",
                 CUDA_VISIBLE_DEVICES="GPU-aaaa,GPU-bbbb")
    assert first.returncode == 0, first.stderr
    # A second job on the same node, sharing GPU 1; this Slurm gives indices only in CUDA_VISIBLE_DEVICES.
    second = _run("prolog.sh", tmp_path, SLURM_JOB_ID="4243", CUDA_VISIBLE_DEVICES="1,2")
    assert second.returncode == 0, second.stderr
    # The node exporter's reader sees both jobs, GPU by GPU.
    assert read_job_mapping(str(tmp_path / "map")) == {0: ["4242"], 1: ["4242", "4243"], 2: ["4243"], 3: ["4242"]}
    targets = json.loads((tmp_path / "sd" / "probes-4242-p5-007.json").read_text())
    assert targets == [{"targets": ["p5-007:9420", "p5-007:9421", "p5-007:9422"],
                        "labels": {"slurm_job_id": "4242", "slurm_partition": "train"}}]

    # Prometheus accepts the target files (promtool validates file_sd files it finds).
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(_prometheus_config(tmp_path / "sd"))
    res = promserver.promtool("check", "config", str(cfg))
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr

    # The epilog of job 4242 leaves job 4243 exactly as it was.
    done = _run("epilog.sh", tmp_path, SLURM_JOB_ID="4242")
    assert done.returncode == 0, done.stderr
    assert read_job_mapping(str(tmp_path / "map")) == {1: ["4243"], 2: ["4243"]}
    assert sorted(p.name for p in (tmp_path / "map").iterdir() if not p.name.startswith(".")) == ["1", "2"]
    assert [p.name for p in (tmp_path / "sd").iterdir()] == ["probes-4243-p5-007.json"]
    assert _run("epilog.sh", tmp_path, SLURM_JOB_ID="4243").returncode == 0
    assert read_job_mapping(str(tmp_path / "map")) == {}
    assert list((tmp_path / "sd").iterdir()) == []


def test_promtool_rejects_a_broken_target_file(tmp_path: Path) -> None:
    """The check above can fail: a target list Prometheus cannot use is reported."""
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "probes-1-x.json").write_text('[{"targets": ["p5-007:9420"], "labels": {"0bad": "x"}}]')
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(_prometheus_config(tmp_path / "sd"))
    res = promserver.promtool("check", "config", str(cfg))
    assert res.returncode != 0
    assert '"0bad" is not a valid label name' in res.stdout + res.stderr


@pytest.mark.slow
def test_prometheus_discovers_the_probes_of_a_job(tmp_path: Path, prometheus_factory) -> None:
    assert _run("prolog.sh", tmp_path, SLURM_JOB_ID="77", SLURM_JOB_GPUS="0-1").returncode == 0
    cfg = yaml.safe_load(_prometheus_config(tmp_path / "sd"))
    cfg.pop("remote_write")  # no AWS here; the scrape side is what is tested
    prom = prometheus_factory(yaml.safe_dump(cfg))
    labels: list[dict[str, str]] = []

    def discovered() -> bool:
        nonlocal labels
        body = requests.get(f"{prom.url}/api/v1/targets", params={"state": "any"}, timeout=30).json()
        labels = [t["labels"] for t in body["data"]["activeTargets"] if t["labels"]["job"] == "rankwatch-probe"]
        return len(labels) >= 2

    wait_until(discovered, "Prometheus to discover the job's probes", every=0.2)
    assert sorted(t["instance"] for t in labels) == ["p5-007:9420", "p5-007:9421"]
    assert {t["slurm_job_id"] for t in labels} == {"77"}


@pytest.mark.parametrize("env", [
    {},  # SLURM_JOB_ID unset
    {"SLURM_JOB_ID": "12; rm -rf /"},  # malformed
    {"SLURM_JOB_ID": "5", "CUDA_VISIBLE_DEVICES": "GPU-4f1e,GPU-77aa"},  # UUIDs only (Slurm >= 25.11)
    {"SLURM_JOB_ID": "5", "SLURM_JOB_GPUS": "0", "RANKWATCH_JOB_MAPPING_DIR": "/proc/rankwatch-no",
     "RANKWATCH_FILE_SD_DIR": "/proc/rankwatch-no"},  # unwritable directories
], ids=["no-job-id", "malformed-id", "uuids-only", "unwritable"])
def test_prolog_and_epilog_never_fail_the_job(tmp_path: Path, env: dict[str, str]) -> None:
    for script in ("prolog.sh", "epilog.sh"):
        res = _run(script, tmp_path, **env)
        assert res.returncode == 0, f"{script}: {res.stderr}"
    assert read_job_mapping(str(tmp_path / "map")) == {}
    assert list((tmp_path / "sd").glob("*")) == []  # no target file left behind (nor a directory's content)


def _unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file as section → key → values (keys such as DeviceAllow repeat)."""
    unit: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] = {}
    for line in (SLURM / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = unit.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            section.setdefault(key, []).append(value)
    return unit


@pytest.mark.parametrize("name", ["rankwatch-node-exporter.service", "rankwatch-detector.service"])
def test_systemd_units_are_hardened_and_run_rankwatch(name: str) -> None:
    unit = _unit(name)
    svc = unit["Service"]
    for key, value in (("DynamicUser", "yes"), ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes"), ("CapabilityBoundingSet", ""),
                       ("Restart", "always")):
        assert svc[key] == [value], f"{name}: {key}"
    argv = shlex.split(svc["ExecStart"][0].replace("${PROMETHEUS_URL}", "http://localhost:9090"))
    assert argv[0] == "/opt/rankwatch/venv/bin/rankwatch"
    build_parser().parse_args(argv[1:])  # SystemExit on an unknown subcommand or flag
    if name.startswith("rankwatch-node"):
        # NVML needs the GPU device nodes: allowed by name, not by PrivateDevices=no alone.
        assert svc["DevicePolicy"] == ["closed"] and "char-nvidia-frontend rw" in svc["DeviceAllow"]
        assert "--job-mapping-dir" in argv
        mapping = argv[argv.index("--job-mapping-dir") + 1]
        defaults = dict(line.split("=", 1) for line in (SLURM / "rankwatch.default").read_text().splitlines()
                        if line and not line.startswith("#"))
        assert defaults["RANKWATCH_JOB_MAPPING_DIR"] == mapping, "prolog.sh and the exporter must agree"
    else:
        assert svc["PrivateDevices"] == ["yes"]


def test_amp_remote_write_config_is_valid() -> None:
    cfg = yaml.safe_load((SLURM / "prometheus-amp.yml").read_text())
    (rw,) = cfg["remote_write"]
    assert rw["sigv4"]["region"] and "/api/v1/remote_write" in rw["url"]
    res = promserver.promtool("check", "config", str(SLURM / "prometheus-amp.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    probe_glob = next(j for j in cfg["scrape_configs"] if j["job_name"] == "rankwatch-probe")
    defaults = (SLURM / "rankwatch.default").read_text()
    sd_dir = probe_glob["file_sd_configs"][0]["files"][0].rsplit("/", 1)[0]
    assert f"RANKWATCH_FILE_SD_DIR={sd_dir}\n" in defaults, "Prometheus must read where prolog.sh writes"


def test_shell_scripts_parse() -> None:
    for script in (SLURM / "prolog.sh", SLURM / "epilog.sh", SLURM / "hyperpod" / "install-rankwatch.sh"):
        res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, f"{script}: {res.stderr}"


def test_tmpfiles_creates_the_mapping_directory_the_unit_and_prolog_use(tmp_path: Path) -> None:
    """/run is a tmpfs: the directory must exist at every boot, before any job's prolog. The
    shipped tmpfiles.d line, applied by the real systemd-tmpfiles under a scratch root, creates
    exactly the directory that the unit passes and prolog.sh writes, root-owned, mode 0755."""
    tmpfiles = shutil.which("systemd-tmpfiles")
    if tmpfiles is None:
        pytest.skip("systemd-tmpfiles not installed")
    conf = SLURM / "rankwatch.tmpfiles.conf"
    res = subprocess.run([tmpfiles, f"--root={tmp_path}", "--create", str(conf)], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    argv = shlex.split(_unit("rankwatch-node-exporter.service")["Service"]["ExecStart"][0])
    mapping = argv[argv.index("--job-mapping-dir") + 1]
    created = tmp_path / mapping.lstrip("/")
    assert created.is_dir()
    st = created.stat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o755, 0)
    install = (SLURM / "hyperpod" / "install-rankwatch.sh").read_text()
    assert '"$DEPLOY/rankwatch.tmpfiles.conf" /etc/tmpfiles.d/rankwatch.conf' in install
    assert "systemd-tmpfiles --create /etc/tmpfiles.d/rankwatch.conf" in install


@pytest.mark.slow
def test_the_unit_command_serves_before_the_first_job(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """The unit's own ExecStart on a node that has run no job yet (no mapping directory):
    the exporter serves instead of exiting, which made Restart=always loop."""
    argv = shlex.split(_unit("rankwatch-node-exporter.service")["Service"]["ExecStart"][0])
    missing = tmp_path / "run" / "rankwatch" / "job-mapping"
    argv[argv.index("--job-mapping-dir") + 1] = str(missing)
    port = promserver.free_port()
    argv[argv.index("--web.listen-address") + 1] = f"127.0.0.1:{port}"
    # no NVIDIA driver here: simulated GPUs, the committed fixture sysfs tree
    cmd = [sys.executable, "-m", "rankwatch", *argv[1:], "--simulate", "--simulate-gpus", "1", "--simulate-efa", "0",
           "--path.sysfs", str(REPO / "tests" / "fixtures" / "sysfs")]
    log = tmp_path / "exporter.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env)
    try:
        promserver.wait_http_ok(f"http://127.0.0.1:{port}/healthz", timeout=60, proc=proc)
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        assert 'rankwatch_exporter_collector_success{collector="gpu"} 1' in text
        assert proc.poll() is None
    finally:
        proc.terminate()
        code = proc.wait(timeout=20)
    assert code == 0, log.read_text()


def test_detector_unit_listens_where_its_prometheus_scrapes() -> None:
    argv = shlex.split(_unit("rankwatch-detector.service")["Service"]["ExecStart"][0])
    listen = argv[argv.index("--listen") + 1]
    assert listen == "127.0.0.1:9415", "the detector beside Prometheus needs loopback only"
    cfg = yaml.safe_load((SLURM / "prometheus-amp.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "rankwatch-detector")
    assert job["static_configs"][0]["targets"] == [listen]
