"""deploy/production-stack/values-lmcache-fs.yaml: what production-stack's chart deploys with it.

No copy of the vllm-stack chart lives in this repository: deploy/production-stack/
vllm-stack-rendered.yaml holds the chart rendered with our values (by Helm's own engine,
see deploy/render_manifest.py), and records the digest of the values file it came from.
These tests validate that rendering strictly against Kubernetes' schemas, load the
engines' and the gc service's settings with lmcache-fs' own loader, and parse the gc's
command line with `lmcache-fs`' parser. With VLLM_STACK_CHART naming a checkout of the
chart's helm/ folder, they also re-render it and check our values against the chart's
values.schema.json.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kube import (
    Object,
    all_of,
    claim_mount,
    container,
    env,
    find,
    gc_command,
    pod_labels,
    selects,
    service_ports,
    settings_loaded_by,
    transfer_config,
    validate_all_strictly,
)
from lmcache_fs.connector.plugin import CONNECTOR_NAME

from deploy.render_manifest import (
    STACK_RENDERED,
    STACK_VALUES,
    objects,
    render,
    stack_manifest,
    stack_values,
    values_digest,
)

SHARED_MOUNT = "/data/shared-pvc-storage"  # where the chart mounts sharedPvcStorage in engines
CHART = os.environ.get("VLLM_STACK_CHART")
needs_chart = pytest.mark.skipif(
    not CHART, reason="re-rendering needs production-stack's chart: set VLLM_STACK_CHART to its helm/ folder")


def rendered() -> list[Object]:
    return [d for d in yaml.safe_load_all(STACK_RENDERED.read_text()) if d]


def engines(objs: list[Object]) -> Object:
    return find(objs, "Deployment", "vllm-mistral-deployment-vllm")


def gc(objs: list[Object]) -> Object:
    return find(objs, "Deployment", "vllm-lmcache-fs-gc")


def test_the_rendering_is_of_the_current_values_file() -> None:
    # Guards against editing the values and not re-rendering (which needs the chart).
    recorded = re.search(r"^# values sha256: (\w+)$", STACK_RENDERED.read_text(), re.MULTILINE)
    assert recorded and recorded.group(1) == values_digest(), \
        "vllm-stack-rendered.yaml is stale: re-render it (see deploy/render_manifest.py)"


def test_every_object_validates_strictly_against_the_kubernetes_schema() -> None:
    objs = rendered()
    validate_all_strictly(objs)
    assert len(all_of(objs, "ServiceMonitor")) == 2


def test_the_engines_run_lmcache_fs_not_lmcache() -> None:
    vllm = container(engines(rendered()), "vllm")
    assert vllm["command"][:2] == ["vllm", "serve"]
    assert transfer_config(vllm["command"]) == {"kv_connector": CONNECTOR_NAME, "kv_role": "kv_both"}
    # One connector only: with lmcacheConfig enabled the chart would add LMCache's as well.
    assert sum(a == "--kv-transfer-config" for a in vllm["command"]) == 1
    assert not [name for name in env(vllm) if name.startswith("LMCACHE_") and name != "LMCACHE_CONFIG_FILE"]
    assert "--enable-prefix-caching" in vllm["command"]
    assert vllm["image"] == "REGISTRY/lmcache-fs:latest"
    assert engines(rendered())["spec"]["replicas"] >= 2


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
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert vllm[probe]["httpGet"]["path"] == "/health"
    assert {"cpu", "memory", "nvidia.com/gpu"} <= vllm["resources"]["requests"].keys()


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


def test_the_settings_configmap_name_does_not_depend_on_the_release() -> None:
    # The chart passes extraVolumes to the pods untemplated: a name with the release in it
    # would only work for one release name.
    values = yaml.safe_load(STACK_VALUES.read_text())
    (model,) = values["servingEngineSpec"]["modelSpec"]
    (volume,) = [v for v in model["extraVolumes"] if "configMap" in v]
    (config_map,) = [o for o in values["extraObjects"] if isinstance(o, dict) and o["kind"] == "ConfigMap"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert "{{" not in config_map["metadata"]["name"]


def test_an_update_needs_no_spare_gpu() -> None:
    rolling = engines(rendered())["spec"]["strategy"]["rollingUpdate"]
    assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (0, 1)


def test_a_disruption_budget_covers_the_engines() -> None:
    objs = rendered()
    budget = find(objs, "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    assert selects(budget["spec"]["selector"]["matchLabels"], pod_labels(engines(objs)))


def test_the_service_monitors_scrape_the_engines_and_the_gc_service() -> None:
    objs = rendered()
    scraped = set()
    for monitor in all_of(objs, "ServiceMonitor"):
        # kube-prometheus-stack as the chart configures it selects monitors by this label.
        assert monitor["metadata"]["labels"]["app.kubernetes.io/part-of"] == "vllm-stack"
        for service in all_of(objs, "Service"):
            if selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"].get("labels", {})):
                scraped |= {(service["metadata"]["name"], e["port"]) for e in monitor["spec"]["endpoints"]
                            if e["port"] in service_ports(service)}
    assert scraped == {("vllm-mistral-engine-service", "service-port"), ("vllm-lmcache-fs-gc", "metrics")}


@needs_chart
def test_the_rendering_is_what_the_chart_gives_today() -> None:
    assert STACK_RENDERED.read_text() == stack_manifest(Path(CHART)), \
        "re-render: .venv/bin/python deploy/render_manifest.py --vllm-stack $VLLM_STACK_CHART"


@needs_chart
def test_the_values_pass_the_charts_own_schema() -> None:
    # The chart's .helmignore hides values.schema.json from Helm itself: check it here.
    schema = json.loads((Path(CHART) / "values.schema.json").read_text())
    jsonschema.validate(stack_values(service_monitor=False), schema)
    wrong: dict[str, Any] = copy.deepcopy(stack_values(service_monitor=False))
    wrong["servingEngineSpec"]["modelSpec"][0]["vllmConfig"]["enablePrefixCaching"] = "yes"
    with pytest.raises(jsonschema.ValidationError, match="'yes'"):
        jsonschema.validate(wrong, schema)


@needs_chart
def test_without_service_monitors_nothing_needs_the_prometheus_operator() -> None:
    objs = objects(render(Path(CHART), stack_values(service_monitor=False), "prod"))
    assert not all_of(objs, "ServiceMonitor")
    validate_all_strictly(objs)
    # Another release name: the engines and the gc still find their claim and settings.
    for deployment in all_of(objs, "Deployment"):
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            if c["name"] in ("vllm", "gc"):
                claim_mount(deployment, c, "prod-shared-pvc-storage-claim")
