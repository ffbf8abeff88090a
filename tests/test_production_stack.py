"""deploy/production-stack/values-lmcache-fs.yaml: production-stack's own chart, rendered with it.

The vllm-stack chart (vendored in tests/vendor/vllm-stack, see SOURCE.md there) is
rendered offline by Helm's own engine with our values file; every object is validated
strictly against Kubernetes' schemas, the values against the chart's values.schema.json
(which the chart's .helmignore keeps Helm itself from reading), and the engines'
settings are loaded by lmcache-fs' own loader.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from kube import (
    Object,
    all_of,
    claim_mount,
    container,
    env,
    find,
    gc_command,
    load_yaml,
    pod_labels,
    selects,
    service_ports,
    settings_loaded_by,
    transfer_config,
    validate_all_strictly,
)
from lmcache_fs.connector.plugin import CONNECTOR_NAME

from deploy.render_manifest import objects, render

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "tests" / "vendor" / "vllm-stack"
VALUES = REPO / "deploy" / "production-stack" / "values-lmcache-fs.yaml"
SHARED_MOUNT = "/data/shared-pvc-storage"  # where the chart mounts sharedPvcStorage in engines


def values(service_monitor: bool = False) -> dict[str, Any]:
    loaded = load_yaml(VALUES)
    loaded["servingEngineSpec"]["serviceMonitor"]["enabled"] = service_monitor
    return loaded


def rendered(release: str = "vllm", service_monitor: bool = False) -> list[Object]:
    return objects(render(CHART, values(service_monitor), release))


def engines(objs: list[Object], release: str = "vllm") -> Object:
    return find(objs, "Deployment", f"{release}-mistral-deployment-vllm")


def gc(objs: list[Object], release: str = "vllm") -> Object:
    return find(objs, "Deployment", f"{release}-lmcache-fs-gc")


def test_the_values_pass_the_charts_own_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.validate(values(), schema)
    wrong = copy.deepcopy(values())
    wrong["servingEngineSpec"]["modelSpec"][0]["vllmConfig"]["enablePrefixCaching"] = "yes"
    with pytest.raises(jsonschema.ValidationError, match="enablePrefixCaching|'yes'"):
        jsonschema.validate(wrong, schema)


@pytest.mark.parametrize("service_monitor", [False, True], ids=["plain", "service monitors"])
def test_the_chart_renders_valid_kubernetes_with_them(service_monitor: bool) -> None:
    objs = rendered(service_monitor=service_monitor)
    validate_all_strictly(objs)
    assert len(all_of(objs, "ServiceMonitor")) == (2 if service_monitor else 0)


def test_the_engines_run_lmcache_fs_not_lmcache() -> None:
    vllm = container(engines(rendered()), "vllm")
    assert vllm["command"][:2] == ["vllm", "serve"]
    assert transfer_config(vllm["command"]) == {"kv_connector": CONNECTOR_NAME, "kv_role": "kv_both"}
    # One connector only: with lmcacheConfig enabled the chart would add LMCache's as well.
    assert sum(a == "--kv-transfer-config" for a in vllm["command"]) == 1
    assert not [name for name in env(vllm) if name.startswith("LMCACHE_") and name != "LMCACHE_CONFIG_FILE"]
    assert "--enable-prefix-caching" in vllm["command"]
    assert vllm["image"] == "REGISTRY/lmcache-fs:latest"


def test_the_engines_keep_the_cache_and_the_weights_on_the_shared_claim(tmp_path: Path) -> None:
    objs = rendered()
    deployment = engines(objs)
    vllm = container(deployment, "vllm")
    claim = find(objs, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    shared = claim_mount(deployment, vllm, claim["metadata"]["name"])["mountPath"]
    assert shared == SHARED_MOUNT
    config = settings_loaded_by(deployment, vllm, objs, tmp_path)
    assert Path(config.storage_path).is_relative_to(shared)
    assert config.max_disk_size_gb > 0
    assert env(vllm)["HF_HOME"]["value"] == shared, "the weights are downloaded once, to the claim"
    size = int(claim["spec"]["resources"]["requests"]["storage"].removesuffix("Gi"))
    assert size * 2**30 > (config.max_disk_size_gb + config.min_free_disk_gb) * 1e9


def test_the_gc_service_works_on_the_engines_directory(tmp_path: Path) -> None:
    objs = rendered()
    deployment, daemon = gc(objs), container(gc(objs), "gc")
    claim = find(objs, "PersistentVolumeClaim")["metadata"]["name"]
    assert claim_mount(deployment, daemon, claim)["mountPath"] == SHARED_MOUNT
    engine_deployment = engines(objs)
    assert settings_loaded_by(deployment, daemon, objs, tmp_path) == \
        settings_loaded_by(engine_deployment, container(engine_deployment, "vllm"), objs, tmp_path)
    args = gc_command(daemon)
    (port,) = daemon["ports"]
    assert args.metrics_port == port["containerPort"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert daemon[probe]["httpGet"] == {"path": "/health", "port": port["name"]}
    assert deployment["spec"]["replicas"] == 1
    assert daemon["image"] == container(engine_deployment, "vllm")["image"]
    service = find(objs, "Service", "vllm-lmcache-fs-gc")
    assert selects(service["spec"]["selector"], pod_labels(deployment))


def test_a_release_of_any_name_finds_its_settings_and_claim(tmp_path: Path) -> None:
    # extraVolumes are not templated by the chart: the settings must not depend on the release.
    objs = rendered(release="prod")
    for deployment, name in ((engines(objs, "prod"), "vllm"), (gc(objs, "prod"), "gc")):
        settings_loaded_by(deployment, container(deployment, name), objs, tmp_path)
        claim_mount(deployment, container(deployment, name), "prod-shared-pvc-storage-claim")


def test_a_disruption_budget_covers_the_engines() -> None:
    objs = rendered()
    budget = find(objs, "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    assert selects(budget["spec"]["selector"]["matchLabels"], pod_labels(engines(objs)))


def test_the_service_monitors_scrape_the_engines_and_the_gc_service() -> None:
    objs = rendered(service_monitor=True)
    scraped = set()
    for monitor in all_of(objs, "ServiceMonitor"):
        # kube-prometheus-stack as the chart configures it selects monitors by this label.
        assert monitor["metadata"]["labels"]["app.kubernetes.io/part-of"] == "vllm-stack"
        for service in all_of(objs, "Service"):
            if selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"].get("labels", {})):
                scraped |= {(service["metadata"]["name"], e["port"]) for e in monitor["spec"]["endpoints"]
                            if e["port"] in service_ports(service)}
    assert scraped == {("vllm-mistral-engine-service", "service-port"), ("vllm-lmcache-fs-gc", "metrics")}
