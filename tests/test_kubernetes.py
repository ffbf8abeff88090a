"""deploy/kubernetes.yaml: the chart's default rendering, valid Kubernetes, settings lmcache-fs accepts.

No cluster here: every resource is validated offline against Kubernetes' own OpenAPI
schemas (strict), the connector's settings are loaded by lmcache-fs' own config loader
exactly as the pods load them, and the gc service's command line by the `lmcache-fs` parser.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import requests
import yaml
from kube import (
    KUBERNETES_VERSION,
    Object,
    all_of,
    claim_mount,
    container,
    env,
    find,
    gc_command,
    mount,
    pod_labels,
    selects,
    service_ports,
    settings_loaded_by,
    transfer_config,
    validate_strictly,
    volumes,
)
from lmcache_fs.connector.plugin import CONNECTOR_NAME

from deploy.render_manifest import MANIFEST, manifest

REPO = Path(__file__).resolve().parent.parent


def resources() -> list[Object]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def engines() -> Object:
    return find(resources(), "Deployment", "lmcache-fs")


def gc() -> Object:
    return find(resources(), "Deployment", "lmcache-fs-gc")


def vllm() -> Object:
    return container(engines(), "vllm")


def test_the_manifest_is_the_chart_rendered_with_its_defaults() -> None:
    # Guards against editing the chart (or the manifest) and not the other.
    assert MANIFEST.read_text() == manifest(), \
        "deploy/kubernetes.yaml is stale: run .venv/bin/python deploy/render_manifest.py"


@pytest.mark.parametrize("index", range(8))
def test_each_resource_validates_strictly_against_the_kubernetes_schema(index: int) -> None:
    assert len(resources()) == 8, [(r["kind"], r["metadata"]["name"]) for r in resources()]
    validate_strictly(resources()[index])


def test_a_misspelt_field_would_be_caught() -> None:
    deployment = engines()
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_replicas_run_vllm_serve_with_the_connector_whatever_the_images_entrypoint() -> None:
    # An explicit command works whether the image keeps vLLM's entrypoint or clears it.
    assert vllm()["command"] == ["vllm", "serve"]
    transfer = transfer_config(vllm()["args"])
    assert transfer == {"kv_connector": CONNECTOR_NAME, "kv_role": "kv_both"}
    assert engines()["spec"]["replicas"] >= 2


def test_the_replicas_and_the_gc_service_load_the_same_settings(tmp_path: Path) -> None:
    engine_cfg = settings_loaded_by(engines(), vllm(), resources(), tmp_path)
    gc_cfg = settings_loaded_by(gc(), container(gc(), "gc"), resources(), tmp_path)
    assert engine_cfg == gc_cfg
    assert engine_cfg.max_disk_size_gb > 0, "a shared volume needs one budget for all replicas"
    assert engine_cfg.storage_path == mount(vllm(), "kv")["mountPath"]


def test_every_replica_and_the_gc_service_mount_one_read_write_many_claim(tmp_path: Path) -> None:
    claim = find(resources(), "PersistentVolumeClaim", "lmcache-fs-kv")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    name = claim["metadata"]["name"]
    config = settings_loaded_by(engines(), vllm(), resources(), tmp_path)
    assert claim_mount(engines(), vllm(), name)["mountPath"] == config.storage_path
    assert claim_mount(gc(), container(gc(), "gc"), name)["mountPath"] == config.storage_path
    # The claim holds the budget plus the free-space floor the stores keep.
    size = re.fullmatch(r"(\d+)Gi", claim["spec"]["resources"]["requests"]["storage"])
    assert size, "the storage request is written in Gi"
    assert int(size.group(1)) * 2**30 >= (config.max_disk_size_gb + config.min_free_disk_gb) * 1e9


def test_the_weights_are_cached_once_on_a_shared_claim() -> None:
    claim = find(resources(), "PersistentVolumeClaim", "lmcache-fs-weights")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    weights = claim_mount(engines(), vllm(), claim["metadata"]["name"])
    assert env(vllm())["HF_HOME"]["value"] == weights["mountPath"]


def test_engines_request_resources_a_gpu_shared_memory_and_health_probes() -> None:
    c = vllm()
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= c["resources"]["requests"].keys()
    assert volumes(engines())["shm"]["emptyDir"]["medium"] == "Memory"
    assert mount(c, "shm")["mountPath"] == "/dev/shm"
    port = re.search(r"--port=(\d+)", " ".join(c["args"]))
    assert port and c["ports"][0]["containerPort"] == int(port.group(1))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": c["ports"][0]["name"]}
    # Liveness must not kill a pod still downloading its model: the startup probe waits long.
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 1200


def test_an_update_needs_no_spare_gpu() -> None:
    # A surge pod would wait for a free GPU, and the rollout with it.
    rolling = engines()["spec"]["strategy"]["rollingUpdate"]
    assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (0, 1)


def test_the_gc_service_is_one_daemon_with_probes_on_its_metrics_port() -> None:
    deployment = gc()
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    c = container(deployment, "gc")
    args = gc_command(c)
    (port,) = c["ports"]
    assert args.metrics_port == port["containerPort"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": port["name"]}
    assert {"cpu", "memory"} <= c["resources"]["requests"].keys()
    assert c["image"] == vllm()["image"], "one image for the engines and the gc service"


def _listening_on_all_interfaces(port: int) -> bool:
    """Whether a socket listens on 0.0.0.0 (or ::) at `port`: kubelet probes the pod's IP."""
    for table, any_address in (("/proc/net/tcp", "00000000"), ("/proc/net/tcp6", "0" * 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and local == f"{any_address}:{port:04X}":  # 0A: LISTEN
                return True
    return False


def test_the_gc_container_as_rendered_answers_its_probes_and_stops_on_sigterm(tmp_path: Path) -> None:
    # The pod, here: the claim is a folder, the ConfigMap a file, the port a free one.
    c = container(gc(), "gc")
    config_map = find(resources(), "ConfigMap", volumes(gc())["settings"]["configMap"]["name"])
    settings = yaml.safe_load(config_map["data"]["lmcache-fs.yaml"])
    (tmp_path / "kv").mkdir()
    settings_file = tmp_path / "lmcache-fs.yaml"
    settings_file.write_text(yaml.safe_dump({**settings, "storage_path": str(tmp_path / "kv")}))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [f"--metrics-port={port}" if a.startswith("--metrics-port") else a for a in c["args"]]
    command = [str(Path(sys.executable).parent / c["command"][0]), *args]
    daemon = subprocess.Popen(command, env={**os.environ, "LMCACHE_CONFIG_FILE": str(settings_file)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        paths = {c[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")} | {"/metrics"}
        deadline = time.monotonic() + 30
        while True:
            try:
                answers = {p: requests.get(f"http://127.0.0.1:{port}{p}", timeout=2).status_code for p in paths}
                break
            except requests.ConnectionError:
                assert daemon.poll() is None, daemon.communicate()[0]
                assert time.monotonic() < deadline, "the gc daemon never listened"
                time.sleep(0.2)
        assert answers == dict.fromkeys(paths, 200)
        assert _listening_on_all_interfaces(port), "probes come to the pod's IP, not to localhost"
        daemon.send_signal(signal.SIGTERM)  # what Kubernetes sends before it kills the pod
        assert daemon.wait(timeout=15) == 0, daemon.communicate()[0]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_a_disruption_budget_lets_drains_take_one_replica_at_a_time() -> None:
    budget = find(resources(), "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    selector = budget["spec"]["selector"]["matchLabels"]
    assert selects(selector, pod_labels(engines()))
    assert not selects(selector, pod_labels(gc())), "a budget on the single gc pod blocks drains"


@pytest.mark.parametrize("name", ["lmcache-fs", "lmcache-fs-gc"])
def test_services_reach_their_pods_and_pods_ask_to_be_scraped(name: str) -> None:
    deployment, service = find(resources(), "Deployment", name), find(resources(), "Service", name)
    assert selects(service["spec"]["selector"], pod_labels(deployment))
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels(deployment))
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == c["ports"][0]["name"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(c["ports"][0]["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"
    # The other deployment's pods are not behind this service.
    others = [d for d in all_of(resources(), "Deployment") if d["metadata"]["name"] != name]
    assert not any(selects(service["spec"]["selector"], pod_labels(d)) for d in others)


def test_the_token_comes_from_a_secret_never_the_manifest() -> None:
    token = env(vllm())["HF_TOKEN"]
    assert "value" not in token and token["valueFrom"]["secretKeyRef"]["name"]
    assert "HF_TOKEN" not in env(container(gc(), "gc")), "the gc service needs no token"


def test_settings_change_restarts_the_pods() -> None:
    # A ConfigMap edit alone never reaches running pods: the checksum annotation rolls them.
    for deployment in (engines(), gc()):
        assert deployment["spec"]["template"]["metadata"]["annotations"]["checksum/settings"]


def test_it_serves_the_model_the_compose_demo_serves() -> None:
    model = vllm()["args"][0]
    dotenv: dict[str, Any] = dict(line.split("=", 1) for line in (REPO / ".env").read_text().splitlines()
                                  if line.strip() and not line.startswith("#"))
    assert model == dotenv["MODEL"]
    assert service_ports(find(resources(), "Service", "lmcache-fs"))["http"]["port"] == 8000
