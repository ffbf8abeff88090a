"""deploy/production-stack/values-lmcache-fs.yaml: what production-stack's chart deploys with it.

No part of the vllm-stack chart lives in this repository, neither its templates nor a
rendering of them. Offline, these tests check our values file itself: its keys against
docs/kubernetes.md, its extraObjects (expanded by Helm's own `tpl`, as the chart does) strictly
against Kubernetes' schemas, the settings ConfigMap through lmcache-fs' own loader, the gc
command line through `lmcache-fs`' parser, and the engines' connector flags. With
VLLM_STACK_CHART naming a checkout of the chart's helm/ folder, they also render the chart
with our values on the fly (Helm's engine, see deploy/render_manifest.py) and check what it
makes of them, and our values against the chart's values.schema.json.
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
    STACK_RELEASE,
    STACK_VALUES,
    main,
    objects,
    render,
    stack_values,
)
from lmcache_fs.config import CONFIG_FILE_ENV, LMCacheFSConfig

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "kubernetes.md"
SHARED_MOUNT = "/data/shared-pvc-storage"  # where the chart mounts sharedPvcStorage in engines
# The chart's name for sharedPvcStorage's claim; the chart tests below check it.
SHARED_CLAIM = f"{STACK_RELEASE}-shared-pvc-storage-claim"
GC_NAME = f"{STACK_RELEASE}-lmcache-fs-gc"
CHART = os.environ.get("VLLM_STACK_CHART")
needs_chart = pytest.mark.skipif(
    not CHART, reason="rendering needs production-stack's chart: set VLLM_STACK_CHART to its helm/ folder")

# A throwaway chart of our own that expands extraObjects with Helm's `tpl`, the way
# production-stack's chart does: the offline tests see the objects with a release's names.
_EXPAND_EXTRA_OBJECTS = ('{{- range .Values.extraObjects }}\n---\n'
                         '{{ tpl (ternary . (toYaml .) (kindIs "string" .)) $ }}\n{{- end }}\n')


def values() -> dict[str, Any]:
    return yaml.safe_load(STACK_VALUES.read_text())


def model_spec() -> Object:
    (model,) = values()["servingEngineSpec"]["modelSpec"]
    return model


def engine_pod(model: Object) -> tuple[Object, Object]:
    """The engine Deployment and its vllm container as far as the values shape them: the
    chart copies a model's env, extraVolumes and extraVolumeMounts into the pod unchanged."""
    deployment = {"spec": {"template": {"spec": {"volumes": model["extraVolumes"]}}}}
    return deployment, {"env": model["env"], "volumeMounts": model["extraVolumeMounts"]}


def engine_settings(model: Object, objs: list[Object], tmp_path: Path) -> LMCacheFSConfig:
    """What the connector in an engine loads: the settings file, then kv_connector_extra_config."""
    deployment, vllm = engine_pod(model)
    overrides = transfer_config(model["vllmConfig"]["extraArgs"]).get("kv_connector_extra_config")
    return settings_loaded_by(deployment, vllm, objs, tmp_path, overrides)


@pytest.fixture(scope="module")
def expander(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chart = tmp_path_factory.mktemp("extra-objects")
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: extra-objects\nversion: 0.0.0\n")
    (chart / "templates").mkdir()
    (chart / "templates" / "objects.yaml").write_text(_EXPAND_EXTRA_OBJECTS)
    return chart


def extra_objects(expander: Path, service_monitor: bool = True) -> list[Object]:
    """The values' extraObjects as Helm expands them for release `vllm`."""
    return objects(render(expander, stack_values(service_monitor), STACK_RELEASE))


def key_paths(node: Any, prefix: str = "") -> set[str]:
    """Every key path of a values tree, inner ones too, written as the docs write them."""
    paths: set[str] = set()
    if isinstance(node, dict):
        for key, child in node.items():
            path = f"{prefix}.{key}" if prefix else key
            paths |= {path} | key_paths(child, path)
    elif isinstance(node, list):
        for i, child in enumerate(node):
            paths |= key_paths(child, f"{prefix}[{i}]")
    return paths


def documented_keys() -> set[str]:
    """The keys in the first column of docs/kubernetes.md's production-stack table: `...x` is
    servingEngineSpec.x, and `.y` after a key stands for that key with its last part y."""
    section = DOCS.read_text().split("\n## production-stack\n")[1].split("\n## ")[0]
    keys: set[str] = set()
    for row in re.findall(r"^\| (`.*?) \|", section, re.MULTILINE):
        first, *siblings = re.findall(r"`([^`]+)`", row)
        first = re.sub(r"^\.\.\.", "servingEngineSpec.", first)
        keys |= {first} | {first.rsplit(".", 1)[0] + sibling for sibling in siblings}
    return keys


def test_the_values_file_sets_exactly_the_keys_docs_kubernetes_md_explains() -> None:
    documented, present = documented_keys(), key_paths(values())
    assert "servingEngineSpec.modelSpec[0].vllmConfig.extraArgs" in documented  # the table was found
    assert not documented - present, f"documented but not set: {sorted(documented - present)}"

    def explained(path: str) -> bool:  # documented, inside a documented key, or holding one
        return any(path == key or path.startswith((key + ".", key + "[")) or
                   key.startswith((path + ".", path + "[")) for key in documented)

    assert not [p for p in present if not explained(p)], \
        f"set but not in docs/kubernetes.md: {sorted(p for p in present if not explained(p))}"


def test_every_extra_object_validates_strictly_against_the_kubernetes_schema(expander: Path) -> None:
    objs = extra_objects(expander)
    assert len(objs) == len(values()["extraObjects"])
    assert sorted((o["kind"], o["metadata"]["name"]) for o in objs) == [
        ("ConfigMap", "lmcache-fs-settings"), ("Deployment", GC_NAME), ("Service", GC_NAME),
        ("ServiceMonitor", GC_NAME)]
    validate_all_strictly(objs)
    assert not all_of(extra_objects(expander, service_monitor=False), "ServiceMonitor")


def test_the_engines_select_lmcache_fs_and_not_lmcache() -> None:
    model = model_spec()
    args = model["vllmConfig"]["extraArgs"]
    transfer = transfer_config(args)
    assert (transfer["kv_connector"], transfer["kv_role"]) == (CONNECTOR_NAME, "kv_both")
    assert sum(a.startswith("--kv-transfer-config") for a in args) == 1
    # Enabled, lmcacheConfig makes the chart add LMCache's own connector and LMCACHE_* variables.
    assert "lmcacheConfig" not in model
    assert [e["name"] for e in model["env"] if e["name"].startswith("LMCACHE_")] == [CONFIG_FILE_ENV]
    # Otherwise the chart passes --no-enable-prefix-caching.
    assert model["vllmConfig"]["enablePrefixCaching"] is True
    assert (model["repository"], model["tag"]) == ("REGISTRY/lmcache-fs", "latest")
    assert model["replicaCount"] >= 2


def test_the_engines_keep_the_cache_on_the_shared_claim(expander: Path, tmp_path: Path) -> None:
    config = engine_settings(model_spec(), extra_objects(expander), tmp_path)
    assert Path(config.storage_path).is_relative_to(SHARED_MOUNT)
    assert config.max_disk_size_gb > 0, "a shared directory needs one budget for all engines"
    shared = values()["sharedPvcStorage"]
    assert shared["enabled"] is True and shared["accessModes"] == ["ReadWriteMany"]
    size = re.fullmatch(r"(\d+)Gi", shared["size"])
    assert size, "the claim's size is written in Gi"
    assert int(size.group(1)) * 2**30 > (config.max_disk_size_gb + config.min_free_disk_gb) * 1e9


def test_the_gc_service_works_on_the_engines_directory(expander: Path, tmp_path: Path) -> None:
    objs = extra_objects(expander)
    deployment = find(objs, "Deployment", GC_NAME)
    daemon = container(deployment, "gc")
    assert claim_mount(deployment, daemon, SHARED_CLAIM)["mountPath"] == SHARED_MOUNT
    assert settings_loaded_by(deployment, daemon, objs, tmp_path) == engine_settings(model_spec(), objs, tmp_path)
    args = gc_command(daemon)
    (port,) = daemon["ports"]
    assert args.metrics_port == port["containerPort"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert daemon[probe]["httpGet"] == {"path": "/health", "port": port["name"]}
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert daemon["image"] == f"{model_spec()['repository']}:{model_spec()['tag']}", "the engines' image"
    service = find(objs, "Service", GC_NAME)
    assert selects(service["spec"]["selector"], pod_labels(deployment))
    assert service_ports(service)["metrics"]["targetPort"] == port["name"]


def test_the_gc_service_monitor_scrapes_the_gc_service(expander: Path) -> None:
    objs = extra_objects(expander)
    monitor, service = find(objs, "ServiceMonitor"), find(objs, "Service", GC_NAME)
    # kube-prometheus-stack as the chart configures it selects monitors by this label.
    assert monitor["metadata"]["labels"]["app.kubernetes.io/part-of"] == "vllm-stack"
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert "metrics" in service_ports(service)


def test_the_settings_configmap_name_does_not_depend_on_the_release() -> None:
    # The chart passes extraVolumes to the pods untemplated: a name with the release in it
    # would only work for one release name.
    (volume,) = [v for v in model_spec()["extraVolumes"] if "configMap" in v]
    (config_map,) = [o for o in values()["extraObjects"] if isinstance(o, dict) and o["kind"] == "ConfigMap"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert "{{" not in config_map["metadata"]["name"]


def test_an_update_needs_no_spare_gpu() -> None:
    # The chart's default surges 100%: a surge pod would wait for a free GPU, the rollout with it.
    strategy = values()["servingEngineSpec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert (strategy["rollingUpdate"]["maxSurge"], strategy["rollingUpdate"]["maxUnavailable"]) == (0, 1)


def test_a_disruption_budget_lets_drains_take_one_engine_at_a_time() -> None:
    assert model_spec()["pdb"] == {"enabled": True, "maxUnavailable": 1}


def test_the_renderer_refuses_to_write_a_rendering_into_the_repository(capsys: pytest.CaptureFixture[str]) -> None:
    out = REPO / "deploy" / "production-stack" / "vllm-stack-rendered.yaml"
    with pytest.raises(SystemExit):
        main(["--vllm-stack", "/nonexistent/helm", "--out", str(out)])
    assert "must not be committed" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def rendered() -> list[Object]:
    """production-stack's chart rendered with our values, ServiceMonitors on, release `vllm`."""
    return objects(render(Path(CHART), stack_values(service_monitor=True), STACK_RELEASE))


def engines(objs: list[Object]) -> Object:
    return find(objs, "Deployment", f"{STACK_RELEASE}-{model_spec()['name']}-deployment-vllm")


@needs_chart
def test_every_object_the_chart_renders_validates_strictly(rendered: list[Object]) -> None:
    validate_all_strictly(rendered)
    assert len(all_of(rendered, "ServiceMonitor")) == 2


@needs_chart
def test_the_chart_runs_the_engines_with_lmcache_fs_not_lmcache(rendered: list[Object]) -> None:
    vllm = container(engines(rendered), "vllm")
    assert vllm["command"][:2] == ["vllm", "serve"]
    assert transfer_config(vllm["command"]) == {"kv_connector": CONNECTOR_NAME, "kv_role": "kv_both"}
    # One connector only: with lmcacheConfig enabled the chart would add LMCache's as well.
    assert sum(a == "--kv-transfer-config" for a in vllm["command"]) == 1
    assert not [name for name in env(vllm) if name.startswith("LMCACHE_") and name != CONFIG_FILE_ENV]
    assert "--enable-prefix-caching" in vllm["command"]
    assert vllm["image"] == "REGISTRY/lmcache-fs:latest"
    assert engines(rendered)["spec"]["replicas"] >= 2


@needs_chart
def test_the_chart_keeps_the_cache_and_the_weights_on_the_shared_claim(rendered: list[Object],
                                                                       tmp_path: Path) -> None:
    deployment = engines(rendered)
    vllm = container(deployment, "vllm")
    claim = find(rendered, "PersistentVolumeClaim", SHARED_CLAIM)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim_mount(deployment, vllm, SHARED_CLAIM)["mountPath"] == SHARED_MOUNT
    config = settings_loaded_by(deployment, vllm, rendered, tmp_path)
    assert Path(config.storage_path).is_relative_to(SHARED_MOUNT)
    assert env(vllm)["HF_HOME"]["value"] == SHARED_MOUNT, "the weights are downloaded once, to the claim"
    assert claim["spec"]["resources"]["requests"]["storage"] == values()["sharedPvcStorage"]["size"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert vllm[probe]["httpGet"]["path"] == "/health"
    assert {"cpu", "memory", "nvidia.com/gpu"} <= vllm["resources"]["requests"].keys()


@needs_chart
def test_the_chart_gives_the_gc_service_the_engines_claim_and_settings(rendered: list[Object],
                                                                       tmp_path: Path) -> None:
    deployment, daemon = find(rendered, "Deployment", GC_NAME), container(find(rendered, "Deployment", GC_NAME), "gc")
    engine = engines(rendered)
    assert claim_mount(deployment, daemon, SHARED_CLAIM)["mountPath"] == \
        claim_mount(engine, container(engine, "vllm"), SHARED_CLAIM)["mountPath"]
    assert settings_loaded_by(deployment, daemon, rendered, tmp_path) == \
        settings_loaded_by(engine, container(engine, "vllm"), rendered, tmp_path)
    assert daemon["image"] == container(engine, "vllm")["image"]


@needs_chart
def test_the_chart_rolls_the_engines_one_at_a_time_within_a_disruption_budget(rendered: list[Object]) -> None:
    rolling = engines(rendered)["spec"]["strategy"]["rollingUpdate"]
    assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (0, 1)
    budget = find(rendered, "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    assert selects(budget["spec"]["selector"]["matchLabels"], pod_labels(engines(rendered)))


@needs_chart
def test_the_service_monitors_scrape_the_engines_and_the_gc_service(rendered: list[Object]) -> None:
    scraped = set()
    for monitor in all_of(rendered, "ServiceMonitor"):
        assert monitor["metadata"]["labels"]["app.kubernetes.io/part-of"] == "vllm-stack"
        for service in all_of(rendered, "Service"):
            if selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"].get("labels", {})):
                scraped |= {(service["metadata"]["name"], e["port"]) for e in monitor["spec"]["endpoints"]
                            if e["port"] in service_ports(service)}
    assert scraped == {(f"{STACK_RELEASE}-{model_spec()['name']}-engine-service", "service-port"),
                       (GC_NAME, "metrics")}


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


@needs_chart
def test_the_renderer_writes_the_charts_rendering_where_it_is_told(rendered: list[Object], tmp_path: Path) -> None:
    out = tmp_path / "vllm-stack.yaml"
    main(["--vllm-stack", str(CHART), "--out", str(out)])
    assert "not to be committed" in out.read_text().splitlines()[1]
    assert [d for d in yaml.safe_load_all(out.read_text()) if d] == rendered
