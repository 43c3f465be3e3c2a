"""deploy/kubernetes: core objects pass kubernetes-validate in strict mode, prometheus-operator
objects pass structural schemas (kubernetes-validate ships none for CRDs) and the
PrometheusRule's groups pass promtool; generated files are in sync; the DaemonSet keeps the
least-privilege promises made in its comments; each namespace enforces the least Pod Security
level its pods need; NetworkPolicies let only Prometheus reach the metrics ports."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
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


# ------------------------------------------------------------------ Pod Security Standards
# The checks of https://kubernetes.io/docs/concepts/security/pod-security-standards/ (v1.30)
# that a pod spec alone decides, named as the page names them.
_BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                  "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}
_SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                 "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                 "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                 "net.ipv4.tcp_keepalive_probes"}


def pss_violations(pod: dict[str, Any], level: str) -> list[str]:
    """The Pod Security Standards controls ``pod`` fails at ``level`` (privileged: none)."""
    if level == "privileged":
        return []
    psc = pod.get("securityContext", {})
    containers = pod.get("containers", []) + pod.get("initContainers", []) + pod.get("ephemeralContainers", [])
    scs = [c.get("securityContext", {}) for c in containers]
    out: list[str] = []

    def fail(name: str, bad: bool) -> None:
        if bad and name not in out:
            out.append(name)

    fail("HostProcess", any(sc.get("windowsOptions", {}).get("hostProcess") for sc in [psc, *scs]))
    fail("host namespaces", any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")))
    fail("privileged containers", any(sc.get("privileged") for sc in scs))
    fail("capabilities", any(set(sc.get("capabilities", {}).get("add", [])) - _BASELINE_CAPS for sc in scs))
    fail("hostPath volumes", any("hostPath" in v for v in pod.get("volumes", [])))
    fail("host ports", any(p.get("hostPort") for c in containers for p in c.get("ports", [])))
    fail("AppArmor", any(sc.get("appArmorProfile", {}).get("type", "RuntimeDefault") not in ("RuntimeDefault", "Localhost")
                         for sc in [psc, *scs]))
    fail("SELinux", any((sc.get("seLinuxOptions", {}).get("type", "") not in
                         ("", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"))
                        or sc.get("seLinuxOptions", {}).get("user") or sc.get("seLinuxOptions", {}).get("role")
                        for sc in [psc, *scs]))
    fail("/proc mount type", any(sc.get("procMount", "Default") != "Default" for sc in scs))
    fail("seccomp", any(sc.get("seccompProfile", {}).get("type") == "Unconfined" for sc in [psc, *scs]))
    fail("sysctls", any(s["name"] not in _SAFE_SYSCTLS for s in psc.get("sysctls", [])))
    if level == "baseline":
        return out
    fail("volume types", any(not (set(v) - {"name"}) <= _RESTRICTED_VOLUMES for v in pod.get("volumes", [])))
    fail("privilege escalation", any(sc.get("allowPrivilegeEscalation") is not False for sc in scs))
    fail("running as non-root", not all(sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True for sc in scs))
    fail("running as non-root user", any(sc.get("runAsUser") == 0 for sc in [psc, *scs]))
    fail("seccomp", not all(sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
                            in ("RuntimeDefault", "Localhost") for sc in scs))
    fail("capabilities", any("ALL" not in sc.get("capabilities", {}).get("drop", [])
                             or set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"} for sc in scs))
    return out


def _namespace_of(doc: dict[str, Any]) -> str:
    """Where kustomize puts ``doc``: its own namespace, else rankwatch (default-namespace.yaml)."""
    return doc["metadata"].get("namespace", "rankwatch")


def _pss_levels() -> dict[str, str]:
    return {ns["metadata"]["name"]: ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
            for ns in _by_kind("Namespace")}


def _workloads() -> list[dict[str, Any]]:
    return _by_kind("DaemonSet") + _by_kind("Deployment")


def test_each_namespace_enforces_the_least_level_its_pods_need() -> None:
    levels = _pss_levels()
    assert levels == {"rankwatch": "restricted", "rankwatch-node": "privileged"}
    for w in _workloads():
        pod = w["spec"]["template"]["spec"]
        ns = _namespace_of(w)
        assert pss_violations(pod, levels[ns]) == [], w["metadata"]["name"]
        if levels[ns] == "privileged":  # nothing lower would admit it, and only for the /sys volume
            assert pss_violations(pod, "baseline") == ["hostPath volumes"]
            assert pss_violations(pod, "restricted") == ["hostPath volumes", "volume types"]
    # the privileged namespace holds the node exporter and nothing else that runs
    assert [w["metadata"]["name"] for w in _workloads() if levels[_namespace_of(w)] == "privileged"] == [
        "rankwatch-node-exporter"]


@pytest.mark.parametrize("mutation,control", [
    (lambda p: p.update(hostNetwork=True), "host namespaces"),
    (lambda p: p["containers"][0]["securityContext"].update(privileged=True), "privileged containers"),
    (lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]), "capabilities"),
    (lambda p: p["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True), "privilege escalation"),
    (lambda p: p["securityContext"].pop("seccompProfile"), "seccomp"),
    (lambda p: p["securityContext"].update(runAsUser=0), "running as non-root user"),
    (lambda p: p["volumes"].append({"name": "x", "hostPath": {"path": "/"}}), "hostPath volumes"),
])
def test_the_pod_security_check_catches_each_violation(mutation: Any, control: str) -> None:
    pod = copy.deepcopy(_by_kind("Deployment")[0]["spec"]["template"]["spec"])
    assert pss_violations(pod, "restricted") == []
    mutation(pod)
    assert control in pss_violations(pod, "restricted")


def test_kustomize_renders_the_namespaces_the_tests_assume() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    res = subprocess.run([kubectl, "kustomize", str(BASE)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rendered = [d for d in yaml.safe_load_all(res.stdout) if d]
    got = {(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")) for d in rendered}
    want = {(d["kind"], d["metadata"]["name"], None if d["kind"] == "Namespace" else _namespace_of(d)) for d in DOCS}
    assert got == want


# ------------------------------------------------------------------ NetworkPolicy
PROMETHEUS = ({"kubernetes.io/metadata.name": "monitoring"}, {"app.kubernetes.io/name": "prometheus"})
OTHER_POD = ({"kubernetes.io/metadata.name": "training"}, {"app": "anything"})


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels is evaluated here"
    return selector.get("matchLabels", {}).items() <= labels.items()


def allowed(policies: list[dict[str, Any]], pod_ns: str, pod_labels: dict[str, str], port: int | str,
            source: tuple[dict[str, str], dict[str, str]], container_ports: dict[str, int]) -> bool:
    """NetworkPolicy semantics for one TCP connection from a pod with ``source`` (namespace
    labels, pod labels) to ``port`` of a pod; a pod no policy selects accepts everything."""
    selecting = [p for p in policies if _namespace_of(p) == pod_ns and _selects(p["spec"]["podSelector"], pod_labels)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    number = container_ports.get(port, port) if isinstance(port, str) else port
    for pol in selecting:
        for rule in pol["spec"].get("ingress", []):
            ports_ok = not rule.get("ports") or any(
                p.get("protocol", "TCP") == "TCP" and (
                    p.get("port") in (None, port, number)
                    or (isinstance(p.get("port"), int) and p["port"] <= number <= p.get("endPort", p["port"])))
                for p in rule["ports"])
            from_ok = "from" not in rule or any(
                _selects(f.get("namespaceSelector", {"matchLabels": {"kubernetes.io/metadata.name": pod_ns}}),
                         source[0]) and _selects(f.get("podSelector", {}), source[1]) for f in rule["from"])
            if ports_ok and from_ok:
                return True
    return False


def test_only_prometheus_reaches_the_metrics_ports() -> None:
    policies = _by_kind("NetworkPolicy")
    for w in _workloads():
        ns = _namespace_of(w)
        labels = w["spec"]["template"]["metadata"]["labels"]
        ports = {p["name"]: p["containerPort"] for c in w["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        same_ns = ({"kubernetes.io/metadata.name": ns}, {"app": "neighbour"})
        assert allowed(policies, ns, labels, "metrics", PROMETHEUS, ports), w["metadata"]["name"]
        for source in (OTHER_POD, same_ns):
            assert not allowed(policies, ns, labels, "metrics", source, ports), (w["metadata"]["name"], source)
            assert not allowed(policies, ns, labels, 22, source, ports)
    # each namespace denies by default: a pod added later is closed until a policy opens it
    for ns in _pss_levels():
        assert not allowed(policies, ns, {"app": "new"}, 8080, OTHER_POD, {})


def test_training_example_opens_its_probes_to_prometheus_only() -> None:
    job, policy = _docs([K8S / "examples" / "training-job.yaml"])
    labels = job["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for c in job["spec"]["containers"] for p in c["ports"]}
    for name in ports:
        assert allowed([policy], "training", labels, name, PROMETHEUS, ports)
        assert not allowed([policy], "training", labels, name, OTHER_POD, ports), name
    for other in (29500, 22, 9419, 9428):  # torchrun's rendezvous, NCCL: as open as before
        assert allowed([policy], "training", labels, other, OTHER_POD, ports)


def test_detector_listens_on_the_pod_address_it_is_scraped_on() -> None:
    """The detector defaults to 127.0.0.1; in a pod, Prometheus reaches it on the pod IP."""
    (dep,) = _by_kind("Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    listen = c["args"][c["args"].index("--listen") + 1]
    assert listen == f"0.0.0.0:{next(p['containerPort'] for p in c['ports'] if p['name'] == 'metrics')}"
