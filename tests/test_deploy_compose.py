"""docker-compose.yml without a Docker engine: the compose-spec JSON schema (vendored in
check-jsonschema, so offline), a semantic check that every referenced file, service, build
target and command exists, and the configuration files it mounts checked by their own tools."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from rankwatch import promserver
from rankwatch.cli import build_parser
from rankwatch.dashboards.manifests import rule_files

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
SERVICE_PORTS = {"prometheus": 9090, "alertmanager": 9093, "grafana": 3000, "detector": 9415, "sim-node": 9410}


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _dockerfile_stages(path: Path) -> dict[str, str]:
    """Build stage name → base image of a Dockerfile."""
    return {m[2]: m[1] for m in re.finditer(r"^FROM\s+(\S+)\s+AS\s+(\S+)", path.read_text(), re.M | re.I)}


def semantic_errors(compose: dict[str, Any], root: Path) -> list[str]:
    """What `docker compose config` would catch beyond the schema, plus this repository's rules:
    pinned images, no default secrets."""
    errors: list[str] = []
    services = compose.get("services", {})
    volumes = set(compose.get("volumes") or {})
    for name, svc in services.items():
        image = svc.get("image")
        if image and not svc.get("build"):
            tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
            if not re.search(r"\d", tag) or tag == "latest":
                errors.append(f"{name}: image {image} is not pinned to a version")
        if not image and not svc.get("build"):
            errors.append(f"{name}: neither image nor build")
        if build := svc.get("build"):
            context = root / build.get("context", ".")
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                errors.append(f"{name}: Dockerfile {dockerfile} missing")
            elif build.get("target") and build["target"] not in _dockerfile_stages(dockerfile):
                errors.append(f"{name}: build target {build['target']} not in {dockerfile.name}")
        deps = svc.get("depends_on") or {}
        for dep in deps if isinstance(deps, list) else deps.keys():
            if dep not in services:
                errors.append(f"{name}: depends_on unknown service {dep}")
            elif isinstance(deps, dict) and deps[dep].get("condition") == "service_healthy" \
                    and "healthcheck" not in services[dep]:
                errors.append(f"{name}: waits for {dep} to be healthy but {dep} has no healthcheck")
        for vol in svc.get("volumes") or []:
            source = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if source.startswith((".", "/")):
                if not (root / source).exists():
                    errors.append(f"{name}: bind mount source {source} missing")
            elif source not in volumes:
                errors.append(f"{name}: named volume {source} not declared")
        mounted = {(s if isinstance(s, str) else s.get("source")): (s if isinstance(s, str) else s.get("target") or s["source"])
                   for s in svc.get("secrets") or []}
        for secret in mounted:
            if secret not in (compose.get("secrets") or {}):
                errors.append(f"{name}: secret {secret} not declared")
        for key, value in (svc.get("environment") or {}).items():
            if key.endswith("_FILE"):
                # <VAR>_FILE names a mounted secret (the Docker secrets convention).
                targets = {f"/run/secrets/{t}" if not t.startswith("/") else t for t in mounted.values()}
                if str(value) not in targets:
                    errors.append(f"{name}: {key}={value} is not a secret mounted in this service")
            elif re.search(r"WEBHOOK|PASSWORD|TOKEN|SECRET|API_KEY", key) and not key.startswith("GF_"):
                errors.append(f"{name}: {key} is a secret: pass it as a compose secret and <VAR>_FILE, "
                              "not as an environment variable")
            elif re.search(r"PASSWORD|TOKEN|SECRET", key) and not re.fullmatch(r"\$\{\w+(:\?.+)?\}", str(value)):
                errors.append(f"{name}: {key} must come from the env file with no default (${{VAR:?…}})")
    return errors


def test_compose_file_matches_the_compose_spec_schema(tmp_path: Path) -> None:
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or "check-jsonschema"
    res = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    broken = copy.deepcopy(_compose())
    broken["services"]["grafana"]["portz"] = ["3000:3000"]
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(broken))
    res = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(bad)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 1 and "portz" in res.stdout


def test_every_reference_resolves() -> None:
    assert semantic_errors(_compose(), REPO) == []


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["services"]["grafana"]["depends_on"].update(promethus={"condition": "service_started"}),
     "depends_on unknown service promethus"),
    (lambda c: c["services"]["prometheus"].update(image="prom/prometheus:latest"), "not pinned"),
    (lambda c: c["services"]["grafana"]["volumes"].append("./dashboardz:/x:ro"), "dashboardz missing"),
    (lambda c: c["services"]["grafana"]["environment"].update(GF_SECURITY_ADMIN_PASSWORD="admin"), "no default"),
    (lambda c: c["services"]["sim-job"]["build"].update(target="trian"), "build target trian"),
    # What the detector got before: the Slack webhook as a plain environment variable.
    (lambda c: c["services"]["detector"].update(environment={"SLACK_WEBHOOK_URL": "${SLACK_WEBHOOK_URL:-}"}),
     "SLACK_WEBHOOK_URL is a secret"),
    (lambda c: c["services"]["detector"].update(secrets=[]), "not a secret mounted"),
])
def test_semantic_check_catches_mistakes(mutate, expected: str) -> None:
    compose = copy.deepcopy(_compose())
    mutate(compose)
    assert any(expected in e for e in semantic_errors(compose, REPO))


def test_slack_webhook_reaches_detector_and_alertmanager_only_as_a_secret(tmp_path: Path) -> None:
    from rankwatch.alerts.config import load_alerting_config

    compose = _compose()
    declared = compose["secrets"]["slack_webhook_url"]
    assert declared == {"environment": "SLACK_WEBHOOK_URL"}
    for name in ("detector", "alertmanager"):
        svc = compose["services"][name]
        assert not any("WEBHOOK" in k and not k.endswith("_FILE") for k in svc.get("environment") or {})
        assert any((s if isinstance(s, str) else s["source"]) == "slack_webhook_url" for s in svc["secrets"])
    # The detector reads the mounted file through SLACK_WEBHOOK_URL_FILE; an empty secret (no
    # Slack in .env) means "Slack off", not an error that stops the detector.
    path = compose["services"]["detector"]["environment"]["SLACK_WEBHOOK_URL_FILE"]
    assert path == "/run/secrets/slack_webhook_url"
    secret = tmp_path / "slack_webhook_url"
    secret.write_text("https://hooks.slack.com/services/T0/B0/compose-secret\n")
    cfg = load_alerting_config({}, environ={"SLACK_WEBHOOK_URL_FILE": str(secret)})
    assert cfg.slack is not None and cfg.slack.webhook_url == "https://hooks.slack.com/services/T0/B0/compose-secret"
    secret.write_text("")
    assert load_alerting_config({}, environ={"SLACK_WEBHOOK_URL_FILE": str(secret)}).slack is None


def test_grafana_password_has_no_default_and_env_example_is_blank() -> None:
    env = _compose()["services"]["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    example = dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example["GRAFANA_ADMIN_PASSWORD"] == ""
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO)
    assert ignored.returncode == 0, ".env must be git-ignored"


def test_rankwatch_commands_parse() -> None:
    services = _compose()["services"]
    parser = build_parser()
    for name in ("detector", "sim-node"):
        parser.parse_args(services[name]["command"])  # SystemExit on an unknown subcommand or flag
    job = services["sim-job"]["command"]
    script = REPO / job[2]
    assert job[0] == "torchrun" and script.is_file()
    for flag in (a.split("=")[0] for a in job[3:]):
        assert f'"{flag}"' in script.read_text(), f"{script.name} has no {flag}"


def test_prometheus_config_scrapes_the_services_and_loads_the_rules(tmp_path: Path) -> None:
    compose = _compose()
    prom = compose["services"]["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prom["volumes"] if v.startswith("./"))
    config_src = next(s for s, t in mounts.items() if t == "/etc/prometheus/prometheus.yml")
    rules_src = next(s for s, t in mounts.items() if t == "/etc/prometheus/rules")
    # Lay the mounts out as the container sees them and let promtool load config and rules.
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copy(REPO / config_src, etc / "prometheus.yml")
    (etc / "rules").symlink_to(REPO / rules_src)
    res = promserver.promtool("check", "config", str(etc / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    cfg = yaml.safe_load((etc / "prometheus.yml").read_text())
    loaded = sorted(p.name for pattern in cfg["rule_files"] for p in etc.glob(pattern))
    assert loaded == [p.name for p in rule_files(REPO / rules_src)], "the glob must match exactly the rule files"
    assert f"Checking {etc}/rules/" in res.stdout  # promtool did read them
    for job in cfg["scrape_configs"]:
        for target in job["static_configs"][0]["targets"]:
            host, port = target.split(":")
            if host == "localhost":
                continue
            assert host in compose["services"], f"{job['job_name']}: {host} is not a service"
            if host in SERVICE_PORTS:
                assert int(port) == SERVICE_PORTS[host]
    (am,) = cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert am == f"alertmanager:{SERVICE_PORTS['alertmanager']}"


def test_alertmanager_config_is_valid() -> None:
    volume = next(v for v in _compose()["services"]["alertmanager"]["volumes"] if v.startswith("./"))
    res = subprocess.run([promserver.find_binary("amtool"), "check-config", str(REPO / volume.split(":")[0])],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_grafana_provisioning_points_at_the_mounted_dashboards() -> None:
    grafana = _compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    prov_dir = REPO / next(s for s, t in mounts.items() if t == "/etc/grafana/provisioning")
    (ds_file,) = (prov_dir / "datasources").glob("*.yaml")
    datasources = yaml.safe_load(ds_file.read_text())["datasources"]
    for ds in datasources:
        host, port = re.match(r"http://([\w-]+):(\d+)", ds["url"]).groups()
        assert SERVICE_PORTS[host] == int(port)
    (provider,) = yaml.safe_load(next((prov_dir / "dashboards").glob("*.yaml")).read_text())["providers"]
    dash_src = next(s for s, t in mounts.items() if t == provider["options"]["path"])
    assert sorted(p.name for p in (REPO / dash_src).glob("*.json")) == sorted(
        ["training-run.json", "gpu-health.json", "efa-network.json", "node.json"])
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (REPO / dash_src / Path(home).relative_to(provider["options"]["path"])).is_file()


def test_detector_listens_where_the_compose_prometheus_scrapes_it() -> None:
    """The detector defaults to 127.0.0.1; in compose, Prometheus is another container, so the
    service passes the address it needs (and publishes no port to the host)."""
    detector = _compose()["services"]["detector"]
    cmd = detector["command"]
    assert cmd[cmd.index("--listen") + 1] == "0.0.0.0:9415"
    assert not detector.get("ports")
    prom = yaml.safe_load((REPO / "deploy" / "compose" / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "rankwatch-detector")
    assert job["static_configs"][0]["targets"] == ["detector:9415"]
