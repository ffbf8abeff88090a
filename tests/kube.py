"""Helpers for the Kubernetes tests: render a chart, find objects, validate them strictly.

No cluster: charts are rendered by Helm's own engine (helm-python-sdk, through
deploy/render_manifest.py) and each object is validated offline against Kubernetes' own
OpenAPI schemas (kubernetes-validate, strict: an unknown or misspelt field fails).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deploy.render_manifest import objects, render
from lmcache_fs.config import CONFIG_FILE_ENV, LMCacheFSConfig, load_config
from lmcache_fs.ops.cli import build_parser

KUBERNETES_VERSION = "1.30.0"  # oldest release still common in clusters; newer ones accept it too
Object = dict[str, Any]
# Custom resources have no schema in Kubernetes' OpenAPI: the tests check them by what they select.
CUSTOM_KINDS = ("ServiceMonitor",)


def render_objects(chart: Path, values: dict[str, Any] | None = None,
                   release: str = "lmcache-fs") -> list[Object]:
    return objects(render(chart, values, release))


def validate_strictly(obj: Object) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def validate_all_strictly(objs: list[Object]) -> None:
    """Validate every object of a rendering, custom resources excepted."""
    for obj in objs:
        if obj["kind"] not in CUSTOM_KINDS:
            validate_strictly(obj)


def find(objs: list[Object], kind: str, name: str | None = None) -> Object:
    """The one object of this kind (and name, if given)."""
    (found,) = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    return found


def all_of(objs: list[Object], kind: str) -> list[Object]:
    return [o for o in objs if o["kind"] == kind]


def container(deployment: Object, name: str) -> Object:
    (found,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def env(c: Object) -> dict[str, Object]:
    return {e["name"]: e for e in c.get("env", [])}


def volumes(deployment: Object) -> dict[str, Object]:
    return {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}


def mount(c: Object, volume: str) -> Object:
    (found,) = [m for m in c["volumeMounts"] if m["name"] == volume]
    return found


def claim_mount(deployment: Object, c: Object, claim: str) -> Object:
    """The container's mount of the volume that holds PersistentVolumeClaim `claim`."""
    (name,) = [n for n, v in volumes(deployment).items()
               if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
    return mount(c, name)


def pod_labels(deployment: Object) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def transfer_config(args: list[str]) -> dict[str, Any]:
    """vLLM's --kv-transfer-config from a command line (`--flag=JSON` or `--flag JSON`)."""
    flag = "--kv-transfer-config"
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return json.loads(arg[len(flag) + 1:])
        if arg == flag:
            return json.loads(args[i + 1])
    raise AssertionError(f"no {flag} in {args}")


def settings_loaded_by(deployment: Object, c: Object, objs: list[Object], tmp_path: Path,
                       overrides: dict[str, Any] | None = None) -> LMCacheFSConfig:
    """The settings this container's lmcache-fs loads: the file LMCACHE_CONFIG_FILE names,
    taken from the ConfigMap mounted over its folder, loaded by lmcache-fs' own loader."""
    file_in_pod = Path(env(c)[CONFIG_FILE_ENV]["value"])
    (volume,) = [m["name"] for m in c["volumeMounts"] if m["mountPath"] == str(file_in_pod.parent)]
    config_map = find(objs, "ConfigMap", volumes(deployment)[volume]["configMap"]["name"])
    local = tmp_path / file_in_pod.name
    local.write_text(config_map["data"][file_in_pod.name])
    return load_config(overrides, str(local))


def gc_command(c: Object) -> Any:
    """The gc container's command line as `lmcache-fs` itself parses it."""
    assert c["command"] == ["lmcache-fs"], c["command"]
    try:
        args = build_parser().parse_args(c["args"])
    except SystemExit:
        pytest.fail(f"`lmcache-fs` rejects the gc container's arguments {c['args']} (see stderr)")
    assert (args.command, args.daemon) == ("gc", True)
    return args


def service_ports(service: Object) -> dict[str, Object]:
    return {p["name"]: p for p in service["spec"]["ports"]}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())
