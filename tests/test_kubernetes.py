"""deploy/kubernetes.yaml: valid Kubernetes, and settings lmcache-fs itself accepts.

No cluster here: every resource is validated offline against Kubernetes'
own OpenAPI schemas (kubernetes-validate, strict: an unknown or misspelt
field fails), and the connector's settings are loaded by lmcache-fs' own
config loader, exactly as the pods would load them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from lmcache_fs.connector.plugin import CONNECTOR_NAME

from lmcache_fs.config import LMCacheFSConfig, load_config

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "deploy" / "kubernetes.yaml"
KUBERNETES_VERSION = "1.30.0"  # oldest release still common in clusters; newer ones accept it too
_TRANSFER = "--kv-transfer-config="


def resources() -> dict[str, dict[str, Any]]:
    """The manifest's resources by kind (each kind appears once)."""
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one resource of each kind expected"
    return by_kind


def engine() -> dict[str, Any]:
    (container,) = resources()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def pod_volumes() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in resources()["Deployment"]["spec"]["template"]["spec"]["volumes"]}


def mount_path(volume: str) -> str:
    (path,) = [m["mountPath"] for m in engine()["volumeMounts"] if m["name"] == volume]
    return path


def transfer_config() -> dict[str, Any]:
    (arg,) = [a for a in engine()["command"] if a.startswith(_TRANSFER)]
    return json.loads(arg[len(_TRANSFER):])


def connector_config(tmp_path: Path) -> LMCacheFSConfig:
    """What a pod's connector loads: the ConfigMap's file, then kv_connector_extra_config."""
    env = {e["name"]: e.get("value") for e in engine()["env"]}
    file_in_pod = Path(env["LMCACHE_CONFIG_FILE"])
    assert str(file_in_pod.parent) == mount_path("config")
    assert pod_volumes()["config"]["configMap"]["name"] == resources()["ConfigMap"]["metadata"]["name"]
    local = tmp_path / file_in_pod.name
    local.write_text(resources()["ConfigMap"]["data"][file_in_pod.name])
    return load_config(transfer_config().get("kv_connector_extra_config"), str(local))


@pytest.mark.parametrize("kind", ["ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"])
def test_each_resource_validates_strictly_against_the_kubernetes_schema(kind: str) -> None:
    kubernetes_validate.validate(resources()[kind], KUBERNETES_VERSION, strict=True)


def test_a_misspelt_field_would_be_caught() -> None:
    deployment = resources()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_replicas_run_the_connector_with_settings_lmcache_fs_accepts(tmp_path: Path) -> None:
    transfer = transfer_config()
    assert transfer["kv_connector"] == CONNECTOR_NAME
    assert transfer["kv_role"] == "kv_both"
    config = connector_config(tmp_path)
    assert config.storage_path == mount_path("kv")
    assert config.max_disk_size_gb > 0, "a shared volume needs one budget for all replicas"
    assert engine()["command"][:2] == ["vllm", "serve"]
    assert resources()["Deployment"]["spec"]["replicas"] >= 2


def test_every_replica_mounts_one_read_write_many_claim(tmp_path: Path) -> None:
    claim = resources()["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pod_volumes()["kv"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    # The claim holds the budget plus the free-space floor the stores keep.
    size = re.fullmatch(r"(\d+)Gi", claim["spec"]["resources"]["requests"]["storage"])
    assert size, "the storage request is written in Gi"
    config = connector_config(tmp_path)
    assert int(size.group(1)) * 2**30 >= (config.max_disk_size_gb + config.min_free_disk_gb) * 1e9


def test_pods_get_a_gpu_shared_memory_and_health_probes() -> None:
    container = engine()
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod_volumes()["shm"]["emptyDir"]["medium"] == "Memory"
    assert mount_path("shm") == "/dev/shm"
    port = re.search(r"--port=(\d+)", " ".join(container["command"]))
    assert port and container["ports"][0]["containerPort"] == int(port.group(1))
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": container["ports"][0]["name"]}


def test_the_token_comes_from_a_secret_never_the_manifest() -> None:
    (token,) = [e for e in engine()["env"] if e["name"] == "HF_TOKEN"]
    assert "value" not in token and token["valueFrom"]["secretKeyRef"]["name"]


def test_the_service_reaches_the_replicas() -> None:
    deployment, service = resources()["Deployment"], resources()["Service"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == engine()["ports"][0]["name"]


def test_it_serves_the_model_the_compose_demo_serves() -> None:
    model = engine()["command"][2]
    env = dict(line.split("=", 1) for line in (REPO / ".env").read_text().splitlines()
               if line.strip() and not line.startswith("#"))
    assert model == env["MODEL"]
