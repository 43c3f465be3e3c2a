"""deploy/kubernetes: core objects pass kubernetes-validate in strict mode, prometheus-operator
objects pass structural schemas (kubernetes-validate ships none for CRDs) and the
PrometheusRule's groups pass promtool; generated files are in sync; the DaemonSet keeps the
least-privilege promises made in its comments."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from rankwatch import promserver
from rankwatch.cli import build_parser
from rankwatch.dashboards.build import dashboard_files
from rankwatch.dashboards.manifests import kubernetes_files, rule_files

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
BASE = K8S / "base"
K8S_VERSION = "1.30.0"  # oldest version EKS still supports in standard support
CRD_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}


def _kustomize_resources(directory: Path) -> list[Path]:
    """Resource files of a kustomization, following directory (base) references."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    out: list[Path] = []
    for entry in kustomization["resources"]:
        path = (directory / entry).resolve()
        assert path.exists(), f"{directory}/kustomization.yaml names missing {entry}"
        out += _kustomize_resources(path) if path.is_dir() else [path]
    return out


def _docs(paths: list[Path]) -> list[dict[str, Any]]:
    return [d for p in paths for d in yaml.safe_load_all(p.read_text()) if d]


DOCS = _docs(_kustomize_resources(BASE))


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in DOCS if d["kind"] == kind]


def _schema(kind: str) -> dict[str, Any]:
    return json.loads((K8S / "schemas" / f"{kind.lower()}-monitoring-v1.json").read_text())


def test_overlay_reaches_every_base_resource() -> None:
    assert _kustomize_resources(K8S / "overlays" / "example") == _kustomize_resources(BASE)
    kinds = {d["kind"] for d in DOCS}
    assert {"DaemonSet", "Deployment", "Service", "PodMonitor", "ServiceMonitor", "PrometheusRule", "ConfigMap"} <= kinds


@pytest.mark.parametrize("doc", [d for d in DOCS if d["kind"] not in CRD_KINDS]
                         + _docs([K8S / "examples" / "training-job.yaml"]),
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_core_objects_validate_strictly(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_strict_validation_rejects_unknown_fields() -> None:
    ds = copy.deepcopy(_by_kind("DaemonSet")[0])
    ds["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {"runAsNonRoot": True}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)


@pytest.mark.parametrize("doc", [d for d in DOCS if d["kind"] in CRD_KINDS],
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_prometheus_operator_objects_match_their_schema(doc: dict[str, Any]) -> None:
    jsonschema.validate(doc, _schema(doc["kind"]))


def test_crd_schema_catches_a_misspelt_field() -> None:
    pm = copy.deepcopy(_by_kind("PodMonitor")[0])
    pm["spec"]["podMetricEndpoints"] = pm["spec"].pop("podMetricsEndpoints")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pm, _schema("PodMonitor"))


def test_node_exporter_daemonset_is_least_privilege() -> None:
    (ds,) = _by_kind("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {"host-sys": "/sys"}
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]} and not sc.get("privileged")
        assert all(m["readOnly"] for m in c["volumeMounts"] if m["name"] in host_paths)
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind])
            assert "nvidia.com/gpu" not in c["resources"][kind], "the exporter must never take a GPU"


def test_detector_reads_secrets_by_reference_only() -> None:
    (dep,) = _by_kind("Deployment")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    secret_envs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e
                   and "secretKeyRef" in e["valueFrom"]}
    assert set(secret_envs) == {"SLACK_WEBHOOK_URL", "WANDB_API_KEY"}
    assert {ref["name"] for ref in secret_envs.values()} == {"rankwatch-detector"}
    assert not _by_kind("Secret"), "no secret values in the manifests"
    for c in dep["spec"]["template"]["spec"]["containers"]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_container_commands_are_rankwatch_commands() -> None:
    parser = build_parser()
    for kind in ("DaemonSet", "Deployment"):
        for workload in _by_kind(kind):
            for c in workload["spec"]["template"]["spec"]["containers"]:
                env = {e["name"]: e.get("value", "x") for e in c.get("env", [])}
                args = [a.replace("$(PROMETHEUS_URL)", env.get("PROMETHEUS_URL", "")) for a in c["args"]]
                parser.parse_args(args)  # exits (SystemExit) on an unknown subcommand or flag


def test_monitors_select_the_pods_and_ports_that_exist() -> None:
    pods = {w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]: w["spec"]["template"]["spec"]
            for kind in ("DaemonSet", "Deployment") for w in _by_kind(kind)}
    services = {s["metadata"]["name"]: s for s in _by_kind("Service")}
    for pm in _by_kind("PodMonitor"):
        name = pm["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/name")
        if name is None:  # the probes' PodMonitor selects training pods
            job = _docs([K8S / "examples" / "training-job.yaml"])[0]
            assert job["metadata"]["labels"].items() >= pm["spec"]["selector"]["matchLabels"].items()
            continue
        ports = {p["name"] for c in pods[name]["containers"] for p in c["ports"]}
        assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= ports
    for sm in _by_kind("ServiceMonitor"):
        name = sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in services[name]["spec"]["ports"]}


def test_generated_manifests_are_in_sync() -> None:
    files = kubernetes_files(dashboard_files(), REPO / "alerts")
    for name, text in files.items():
        assert (BASE / "generated" / name).read_text() == text, f"{name} is stale: run `make dashboards`"
    listed = {p.name for p in _kustomize_resources(BASE) if p.parent.name == "generated"}
    assert listed == set(files), "kustomization.yaml must list every generated file"
    for cm in _by_kind("ConfigMap"):
        (key, text), = cm["data"].items()
        if cm["metadata"]["labels"].get("grafana_alert"):  # the Grafana alert rules (test_dashboards_alerts)
            assert text == (REPO / "dashboards" / "alerting" / key).read_text()
        else:
            assert json.loads(text) == json.loads((REPO / "dashboards" / key).read_text())
        # kubectl apply keeps a copy in an annotation limited to 256 KiB.
        assert len(yaml.safe_dump(cm)) < 256 * 1024


def test_prometheusrule_groups_pass_promtool(tmp_path: Path) -> None:
    (rule,) = _by_kind("PrometheusRule")
    expected = [g for p in rule_files(REPO / "alerts") for g in yaml.safe_load(p.read_text())["groups"]]
    assert rule["spec"]["groups"] == expected
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    res = promserver.promtool("check", "rules", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
