"""deploy/helm/lmcache-fs: Helm's own lint and renderer, with the options users set.

Helm's Go engine runs in-process (helm-python-sdk, the `test` extra): `helm lint --strict`
and `helm template` without a helm binary or a cluster. Every rendering is validated
strictly against Kubernetes' schemas.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import helm_python
import pytest
from kube import (
    Object,
    all_of,
    claim_mount,
    container,
    env,
    find,
    pod_labels,
    selects,
    service_ports,
    settings_loaded_by,
    validate_all_strictly,
    volumes,
)

from deploy.render_manifest import CHART, objects, render

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "lmcache-fs-dashboard.json"

# Option sets users are expected to set; each must render to valid Kubernetes.
OPTIONS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "token in values": {"hfToken": {"value": "hf_test"}},
    "existing claims": {"cache": {"existingClaim": "nfs-kv"},
                        "weights": {"existingClaim": "models", "readOnly": True}},
    "no weights volume": {"weights": {"enabled": False}},
    "service monitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}}},
    "no gc, no budget": {"gc": {"enabled": False}, "engine": {"podDisruptionBudget": {"enabled": False}}},
    "read-only replicas": {"engine": {"kvRole": "kv_consumer", "replicas": 4}},
    "integrity key": {"integrityKey": {"existingSecret": "lmcache-fs-integrity"}},
}


def rendered(values: dict[str, Any] | None = None, release: str = "kv") -> list[Object]:
    return objects(render(CHART, values, release))


def test_the_chart_lints_clean_in_strict_mode() -> None:
    report = helm_python.lint(CHART, strict=True, kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("values", OPTIONS.values(), ids=OPTIONS.keys())
def test_every_option_set_renders_valid_kubernetes(values: dict[str, Any]) -> None:
    objs = rendered(values)
    validate_all_strictly(objs)
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), names


def test_a_token_given_as_a_value_lands_in_a_secret_the_engines_read() -> None:
    objs = rendered(OPTIONS["token in values"])
    secret = find(objs, "Secret")
    ref = env(container(find(objs, "Deployment", "kv-lmcache-fs"), "vllm"))["HF_TOKEN"]["valueFrom"]
    assert ref["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert secret["stringData"][ref["secretKeyRef"]["key"]] == "hf_test"
    assert ref["secretKeyRef"]["optional"] is False, "a token the user gave must be there"


def test_existing_claims_are_mounted_and_none_is_created() -> None:
    objs = rendered(OPTIONS["existing claims"])
    assert not all_of(objs, "PersistentVolumeClaim")
    engines = find(objs, "Deployment", "kv-lmcache-fs")
    vllm = container(engines, "vllm")
    assert claim_mount(engines, vllm, "nfs-kv")["mountPath"] == "/kv"
    gc = find(objs, "Deployment", "kv-lmcache-fs-gc")
    assert claim_mount(gc, container(gc, "gc"), "nfs-kv")["mountPath"] == "/kv"
    # Weights put on the claim beforehand: read-only, and vLLM never tries the hub.
    weights = claim_mount(engines, vllm, "models")
    assert weights["readOnly"] is True
    assert volumes(engines)["weights"]["persistentVolumeClaim"]["readOnly"] is True
    assert env(vllm)["HF_HUB_OFFLINE"]["value"] == "1"
    assert env(vllm)["HF_HOME"]["value"] == weights["mountPath"]


def test_without_a_weights_volume_nothing_points_at_one() -> None:
    objs = rendered(OPTIONS["no weights volume"])
    engines = find(objs, "Deployment", "kv-lmcache-fs")
    assert "weights" not in volumes(engines)
    assert "HF_HOME" not in env(container(engines, "vllm"))
    assert [c["metadata"]["name"] for c in all_of(objs, "PersistentVolumeClaim")] == ["kv-lmcache-fs-kv"]


def test_the_service_monitor_scrapes_the_engines_and_the_gc_service() -> None:
    objs = rendered(OPTIONS["service monitor"])
    monitor = find(objs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kps", "Prometheus selects monitors by label"
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = {(s["metadata"]["name"], e["port"]) for s in all_of(objs, "Service")
               if selects(selector, s["metadata"]["labels"])
               for e in monitor["spec"]["endpoints"] if e["port"] in service_ports(s)}
    assert scraped == {("kv-lmcache-fs", "http"), ("kv-lmcache-fs-gc", "metrics")}
    assert {e["path"] for e in monitor["spec"]["endpoints"]} == {"/metrics"}


def test_without_the_gc_service_nothing_scrapes_or_selects_it() -> None:
    values = {**OPTIONS["no gc, no budget"], **OPTIONS["service monitor"]}
    objs = rendered(values)
    assert [d["metadata"]["name"] for d in all_of(objs, "Deployment")] == ["kv-lmcache-fs"]
    assert [e["port"] for e in find(objs, "ServiceMonitor")["spec"]["endpoints"]] == ["http"]
    assert not all_of(objs, "PodDisruptionBudget")


def test_read_only_replicas_say_so_to_the_connector() -> None:
    objs = rendered(OPTIONS["read-only replicas"])
    engines = find(objs, "Deployment", "kv-lmcache-fs")
    assert engines["spec"]["replicas"] == 4
    (arg,) = [a for a in container(engines, "vllm")["args"] if a.startswith("--kv-transfer-config=")]
    assert json.loads(arg.split("=", 1)[1])["kv_role"] == "kv_consumer"


@pytest.mark.parametrize(("values", "named"), [
    ({"engine": {"replica": 3}}, "'replica' not allowed"),
    ({"engine": {"kvRole": "both"}}, "kvRole"),
    ({"cache": {"size": "500GB"}}, "/cache/size"),
    ({"gc": {"metricsPort": "9400"}}, "/gc/metricsPort"),
])
def test_a_misspelt_or_wrong_value_is_refused_naming_it(values: dict[str, Any], named: str) -> None:
    # values.schema.json: without it Helm ignores an unknown key and renders the default.
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(named)):
        render(CHART, values, "kv")


@pytest.mark.parametrize(("setting", "fix"), [("storage_path", "set cache.mountPath"),
                                              ("integrity_key_file", "set integrityKey.existingSecret")])
def test_a_path_the_chart_mounts_itself_is_refused_in_settings_with_the_fix(setting: str, fix: str) -> None:
    # The chart mounts these itself; a second path would point the pods at nothing.
    with pytest.raises(helm_python.HelmError, match=fix):
        render(CHART, {"settings": {setting: "/elsewhere"}}, "kv")


def test_the_integrity_key_reaches_every_pod_from_a_secret_only_its_owner_reads(tmp_path: Path) -> None:
    objs = rendered(OPTIONS["integrity key"])
    key_files = set()
    for name, container_name in (("kv-lmcache-fs", "vllm"), ("kv-lmcache-fs-gc", "gc")):
        deployment = find(objs, "Deployment", name)
        c = container(deployment, container_name)
        key_file = Path(settings_loaded_by(deployment, c, objs, tmp_path).integrity_key_file)
        (volume,) = [m["name"] for m in c["volumeMounts"] if m["mountPath"] == str(key_file.parent)]
        secret = volumes(deployment)[volume]["secret"]
        assert secret["secretName"] == "lmcache-fs-integrity"
        assert secret["defaultMode"] & 0o077 == 0, "lmcache-fs refuses a key file others can read"
        key_files.add(key_file)
    assert [f.name for f in key_files] == ["integrity.key"], "one key, the same for every pod"


def test_resource_names_follow_the_release_without_doubling_the_chart_name() -> None:
    assert {d["metadata"]["name"] for d in all_of(rendered(release="prod"), "Deployment")} == \
        {"prod-lmcache-fs", "prod-lmcache-fs-gc"}
    assert {d["metadata"]["name"] for d in all_of(rendered(release="lmcache-fs"), "Deployment")} == \
        {"lmcache-fs", "lmcache-fs-gc"}


def test_the_pdb_and_services_select_by_component() -> None:
    objs = rendered()
    engines, gc = find(objs, "Deployment", "kv-lmcache-fs"), find(objs, "Deployment", "kv-lmcache-fs-gc")
    assert pod_labels(engines)["app.kubernetes.io/component"] == "engine"
    assert pod_labels(gc)["app.kubernetes.io/component"] == "gc"


def test_the_dashboard_configmap_carries_the_repositorys_dashboard() -> None:
    # The chart's dashboards/ holds a link to deploy/grafana/, so the two cannot drift.
    config_map = find(rendered(), "ConfigMap", "kv-lmcache-fs-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["lmcache-fs-dashboard.json"]) == json.loads(DASHBOARD.read_text())
