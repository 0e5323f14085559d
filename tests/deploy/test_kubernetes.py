"""Kubernetes manifests and the Dockerfile: schema-valid and consistent with each other.

Schemas come from the kubernetes-validate package, which ships them, so this runs
offline. Cross-references are what a schema cannot see: names, ports, paths and
the TOML inside the ConfigMap.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

from syncd.config import load, validate  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
KUBERNETES_VERSION = "1.30"
IMAGE_REPOSITORY = "ghcr.io/example/syncd"
DUMMY_URI = "mongodb://syncd:dummy@db.example:27017/?replicaSet=rs0"
DRAIN_DEADLINE_S = 25


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def by_kind(kind: str) -> dict[str, Any]:
    found = [d for p in manifest_files() for d in documents(p) if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container() -> dict[str, Any]:
    containers = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def container_port(port: int | str) -> int:
    """Resolve a probe or Service port, by number or by name, to the container port."""
    ports = container()["ports"]
    if isinstance(port, int):
        assert port in [p["containerPort"] for p in ports]
        return port
    matches = [p["containerPort"] for p in ports if p.get("name") == port]
    assert matches, f"no container port named {port!r}"
    return matches[0]


def literal_env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in container().get("env", []) if "value" in e}


def secret_env() -> dict[str, str]:
    return dict(by_kind("Secret")["stringData"])


def configmap_toml() -> str:
    return str(by_kind("ConfigMap")["data"]["syncd.toml"])


# --- schemas -------------------------------------------------------------------


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_matches_the_kubernetes_schema(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name}: {doc['kind']} {where}: {exc.message}")


def test_schema_validation_can_fail() -> None:
    deployment = json.loads(json.dumps(by_kind("Deployment")))
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
    probe["httpGet"]["pathh"] = "/healthz"  # a typo only a strict schema notices

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_existing_manifests() -> None:
    kustomization = documents(K8S / "kustomization.yaml")[0]
    listed = kustomization["resources"]

    for name in listed:
        assert (K8S / name).is_file(), f"kustomization.yaml lists missing {name}"
    # Everything but the example Secret is applied; placeholders must never
    # overwrite real credentials.
    expected = {p.name for p in manifest_files()} - {"secret.example.yaml"}
    assert set(listed) == expected
    assert {i["name"] for i in kustomization.get("images", [])} == {IMAGE_REPOSITORY}


# --- cross-references ------------------------------------------------------------


def test_probes_use_the_metrics_port() -> None:
    c = container()
    listen = literal_env()["SYNCD_TELEMETRY__LISTEN"]
    host, _, port = listen.rpartition(":")
    assert host == "0.0.0.0", "the kubelet probes the pod IP, not loopback"

    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ):
        http = c[probe]["httpGet"]
        assert http["path"] == path
        assert container_port(http["port"]) == int(port)


def test_service_targets_the_metrics_port_of_these_pods() -> None:
    service = by_kind("Service")
    pod_labels = by_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    (port,) = service["spec"]["ports"]

    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert container_port(port["targetPort"]) == 9464


def test_disruption_budget_and_replicas() -> None:
    deployment = by_kind("Deployment")
    pdb = by_kind("PodDisruptionBudget")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    assert deployment["spec"]["replicas"] == 2
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_a_pod_not_ready_for_a_halted_pipeline_does_not_block_node_drains() -> None:
    # /readyz is 503 on the replica holding a halted pipeline until the halt ends; with
    # the default policy, evicting it would need the other replica ready too.
    assert by_kind("PodDisruptionBudget")["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_configmap_validates_as_syncd_settings() -> None:
    data = tomllib.loads(configmap_toml())
    assert "uri" not in data.get("mongodb", {}), "credentials belong in the Secret"

    settings = validate({**data, "mongodb": {**data.get("mongodb", {}), "uri": DUMMY_URI}})

    assert settings.pipelines
    assert settings.checkpoint.store == "mongodb", "replicas share checkpoints and leases"
    assert settings.lease.enabled


def test_pod_environment_and_configmap_load_together(tmp_path: Path) -> None:
    config_file = tmp_path / "syncd.toml"
    config_file.write_text(configmap_toml())

    settings = load(config_file, env={**secret_env(), **literal_env()})

    assert settings.telemetry.listen == "0.0.0.0:9464"
    assert settings.mongodb.uri.get_secret_value() == secret_env()["SYNCD_MONGODB_URI"]
    assert settings.pipelines[0].embedder.api_key_env in secret_env()


def test_grace_period_outlasts_the_drain_deadline(tmp_path: Path) -> None:
    config_file = tmp_path / "syncd.toml"
    config_file.write_text(configmap_toml())
    grace = by_kind("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]

    settings = load(config_file, env={**secret_env(), **literal_env()})

    assert grace > DRAIN_DEADLINE_S
    assert grace > settings.shutdown_timeout_s


def test_config_and_secret_are_wired_into_the_pod() -> None:
    spec = by_kind("Deployment")["spec"]["template"]["spec"]
    c = container()
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}

    config_mount = mounts["/etc/syncd"]
    config_volume = volumes[config_mount["name"]]["configMap"]
    assert config_volume["name"] == by_kind("ConfigMap")["metadata"]["name"]
    assert config_mount.get("readOnly") is True

    config_arg = c["args"][c["args"].index("--config") + 1]
    mounted = {f"/etc/syncd/{item['path']}" for item in config_volume["items"]}
    assert config_arg in mounted

    secret_refs = [e["secretRef"]["name"] for e in c["envFrom"] if "secretRef" in e]
    assert secret_refs == [by_kind("Secret")["metadata"]["name"]]
    assert spec["serviceAccountName"] == by_kind("ServiceAccount")["metadata"]["name"]


def test_writable_paths_are_empty_dirs() -> None:
    spec = by_kind("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}

    for path in ("/var/lib/syncd", "/tmp"):
        assert "emptyDir" in volumes[mounts[path]], path


def test_pod_runs_locked_down() -> None:
    spec = by_kind("Deployment")["spec"]["template"]["spec"]
    pod = spec["securityContext"]
    ctr = container()["securityContext"]

    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == 10001
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert ctr["readOnlyRootFilesystem"] is True
    assert ctr["allowPrivilegeEscalation"] is False
    assert ctr["capabilities"]["drop"] == ["ALL"]
    assert spec["automountServiceAccountToken"] is False
    assert by_kind("ServiceAccount")["automountServiceAccountToken"] is False


def test_resources_are_bounded() -> None:
    resources = container()["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]


def test_every_image_is_the_project_image_at_the_project_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    kustomization = documents(K8S / "kustomization.yaml")[0]
    spec = by_kind("Deployment")["spec"]["template"]["spec"]
    images = [c["image"] for c in spec["containers"] + spec.get("initContainers", [])]

    assert images == [f"{IMAGE_REPOSITORY}:{version}"]
    assert kustomization["images"] == [{"name": IMAGE_REPOSITORY, "newTag": version}]
    assert f"{IMAGE_REPOSITORY}:{version}" in DOCKERFILE.read_text()


# --- Dockerfile ------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions per stage, with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, argument = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), argument.strip()))
    return stages


def last(stage: list[tuple[str, str]], instruction: str) -> str:
    values = [arg for ins, arg in stage if ins == instruction]
    assert values, f"final stage has no {instruction}"
    return values[-1]


def test_dockerfile_is_multi_stage_on_python_311_slim() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in DOCKERFILE.read_text()
    for stage in stages:
        assert stage[0][1].split()[0] == "${PYTHON_IMAGE}"
    final = stages[-1]
    builder = stages[0][0][1].split()[-1]
    assert any(ins == "COPY" and f"--from={builder}" in arg for ins, arg in final)


def test_dockerfile_final_stage_runs_as_the_pods_non_root_user() -> None:
    final = dockerfile_stages()[-1]
    user = last(final, "USER").split(":")[0]

    assert user.isdigit(), "a numeric USER lets runAsNonRoot verify it"
    assert int(user) != 0
    pod_security = by_kind("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert int(user) == pod_security["runAsUser"]


def test_dockerfile_entrypoint_and_port_match_the_deployment() -> None:
    final = dockerfile_stages()[-1]

    assert json.loads(last(final, "ENTRYPOINT")) == ["syncd"]
    assert json.loads(last(final, "CMD")) == container()["args"]
    assert int(last(final, "EXPOSE")) == container_port("metrics")
    env = " ".join(arg for ins, arg in final if ins == "ENV")
    assert "ANONYMIZED_TELEMETRY=False" in env
    assert "PYTHONUNBUFFERED=1" in env


def test_docker_context_admits_what_the_dockerfile_copies() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for stage in dockerfile_stages():
        for instruction, argument in stage:
            if instruction != "COPY" or "--from=" in argument:
                continue
            *sources, _destination = argument.split()
            for source in sources:
                assert source in allowed, f"{source} is excluded by .dockerignore"
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
