"""The Kubernetes manifests (deploy/kubernetes/) validate offline against the cluster's
OpenAPI schemas (kubernetes-validate), agree with the image and the daemon (ports,
paths, the credential, the drain), and their configuration passes `qpi-driver config
check` as the pod would see it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from driver.settings import CREDENTIAL_NAME, Settings
from tests.test_deploy_files import _stage_env, clean_env, parse_dockerfile

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate not installed (the test extra has it)")

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy/kubernetes"
# The oldest Kubernetes still commonly run, and the newest the package knows.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
TARGETS = {"gpu": KUBE / "gpu-statefulset.yaml", "cpu": KUBE / "cpu-statefulset.yaml"}


def documents() -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(KUBE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out.extend((path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return out


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [doc for _, doc in documents()
             if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in {KUBE}"
    return found[0]


def container(statefulset: dict[str, Any]) -> dict[str, Any]:
    containers = statefulset["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name,doc", [d for d in documents() if d[1]["kind"] != "ServiceMonitor"],
                         ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_validates(name: str, doc: dict[str, Any], version: str) -> None:
    # strict: unknown fields (a typo'd probe, a misplaced key) are errors, not ignored
    kubernetes_validate.validate(doc, version, strict=True)


def test_validation_catches_a_typo() -> None:
    doc = json.loads(json.dumps(one("StatefulSet", "qpi-driver-gpu")))
    doc["spec"]["template"]["spec"]["containers"][0]["livenesProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((KUBE / "kustomization.yaml").read_text())["resources"])
    # The example Secret stays out: the real token is created with kubectl, never applied
    # from a file in the repository.
    assert listed == {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml",
                                                              "secret.example.yaml"}


@pytest.mark.parametrize("target", TARGETS)
def test_statefulset_agrees_with_image_and_daemon(target: str) -> None:
    sts = yaml.safe_load(TARGETS[target].read_text())
    instructions = parse_dockerfile((ROOT / "Dockerfile").read_text())
    image_env = _stage_env(instructions, target)
    image_user = next(i.args for i in instructions if i.stage == target and i.keyword == "USER")
    pod = sts["spec"]["template"]
    spec, c = pod["spec"], container(sts)

    # Labels: the selector picks the template's pods; the headless Service is the one
    # named in serviceName and selects the same pods.
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    service = one("Service", sts["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()

    # One GPU per pod on the GPU nodes, none on the CPU ones.
    limits = c["resources"]["limits"]
    assert limits.get("nvidia.com/gpu") == (1 if target == "gpu" else None)
    if target == "gpu":
        assert c["resources"]["requests"]["nvidia.com/gpu"] == 1

    # The result store on the pod's own claim, mounted where the image keeps it.
    claims = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["data"]["mountPath"] == image_env["QPI_DATA_DIR"]
    assert "data" in claims and claims["data"]["spec"]["accessModes"] == ["ReadWriteOnce"]

    # The token Secret mounted where the daemon looks: $CREDENTIALS_DIRECTORY/qpi-access-token.
    volumes = {v["name"]: v for v in spec["volumes"]}
    secret = one("Secret")
    assert mounts["token"]["mountPath"] == image_env["CREDENTIALS_DIRECTORY"]
    assert mounts["token"]["readOnly"] is True
    assert volumes["token"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert set(secret["stringData"]) == {CREDENTIAL_NAME}
    assert "items" not in volumes["token"]["secret"]  # the key is the file name

    # Probes on the metrics port the image listens on.
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"]
    assert str(port) == image_env["QPI_METRICS_ADDR"].rpartition(":")[2]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"

    # Non-root and a read-only root; only the mounted volumes are writable.
    assert spec["securityContext"]["runAsNonRoot"] is True
    # The image's own USER (uid:gid), as the Dockerfile's stage sets it.
    uid, _, gid = image_user.partition(":")
    assert str(spec["securityContext"]["runAsUser"]) == uid
    if gid and "runAsGroup" in spec["securityContext"]:
        assert str(spec["securityContext"]["runAsGroup"]) == gid
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert mounts["tmp"]["mountPath"] == "/tmp" and "emptyDir" in volumes["tmp"]

    # The kubelet's SIGKILL comes after the drain, with time to store and stop.
    env = {e["name"]: e.get("value") for e in c["env"]}
    default = Settings.model_fields["drain_timeout_s"].default
    drain = float(env.get("QPI_DRAIN_TIMEOUT_S") or default)
    assert spec["terminationGracePeriodSeconds"] >= drain + 30, (drain, spec)


def test_servicemonitor_finds_the_metrics_ports() -> None:
    monitor = one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [doc for _, doc in documents() if doc["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"qpi-driver-gpu", "qpi-driver-cpu"}
    for service in services:
        assert selector.items() <= service["metadata"]["labels"].items()
        assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in
                                                           service["spec"]["ports"]}
        # The rules select job="qpi-driver": the job label comes from this Service label.
        assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "qpi-driver"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


@pytest.mark.parametrize("target", TARGETS)
def test_pod_configuration_passes_config_check(target: str, tmp_path: Path) -> None:
    """The settings the pod starts with (image ENV, the ConfigMap, the container's env,
    the Secret as a file) are valid: `qpi-driver config check` as the pod would run it."""
    sts = yaml.safe_load(TARGETS[target].read_text())
    c = container(sts)
    env = _stage_env(parse_dockerfile((ROOT / "Dockerfile").read_text()), target)
    env = {k: v for k, v in env.items() if k.startswith("QPI_") or k == "CREDENTIALS_DIRECTORY"}
    for source in c["envFrom"]:
        env.update(one("ConfigMap", source["configMapRef"]["name"])["data"])
    pod_name = f"{sts['metadata']['name']}-0"
    for item in c["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            env[item["name"]] = pod_name
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for key, value in one("Secret")["stringData"].items():
        (secrets / key).write_text(value)
    env["CREDENTIALS_DIRECTORY"] = str(secrets)
    done = subprocess.run([sys.executable, "-m", "driver", "config", "check"],
                          env=clean_env(**env), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["access_token"] == "********"  # read from the mounted Secret
    assert shown["driver_name"] == pod_name
    assert shown["executor"] == {"gpu": "gpu", "cpu": "aer"}[target]
    assert shown["orchestrator_url"].startswith("https://")
