"""The compose files and .env: valid, and the topology the demo promises on GPUs and on CPU.

docker-compose.yml holds what both stacks share (four engines, two of them on the shared
cache, and the page); docker-compose.override.yml, which `docker compose up` reads by default,
gives the engines their GPUs; docker/compose.cpu.yml turns them into CPU engines instead; the
NFS override moves the cache onto an export. Nothing here needs a Docker engine: the structure
is read from the YAML, and Debian's `docker-compose` (v1.29) validates and resolves the files
offline. tests/test_compose_cpu.py runs the CPU stack for real.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
GPU_OVERRIDE = REPO / "docker-compose.override.yml"
CPU_OVERRIDE = REPO / "docker" / "compose.cpu.yml"
NFS_OVERRIDE = REPO / "docker" / "compose.nfs.yml"
CPU_STACK = ("-f", "docker-compose.yml", "-f", "docker/compose.cpu.yml")
ENGINES = ("engine-a", "engine-b", "engine-c", "engine-d")
CACHED = ("engine-a", "engine-b")
PLAIN = ("engine-c", "engine-d")
_MOUNT_TARGET = re.compile(r":(/[^:]*)(?::(ro|rw))?$")


def services(path: Path = COMPOSE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())["services"]


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> mode ('rw' or 'ro') of a service's short-syntax volumes."""
    out = {}
    for volume in service.get("volumes", []):
        match = _MOUNT_TARGET.search(volume)
        assert match, f"unreadable volume {volume!r}"
        out[match.group(1)] = match.group(2) or "rw"
    return out


def env_file() -> dict[str, str]:
    values = {}
    for line in (REPO / ".env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def docker_compose(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run docker-compose with only .env's values (the caller's shell may set MODEL, HF_TOKEN ...)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (Debian: apt-get install docker-compose); "
                    "the compose files were not validated")
    env = {k: v for k, v in os.environ.items() if k not in env_file()}
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env=env)


@pytest.mark.parametrize("files", [(), CPU_STACK], ids=["gpu-default", "cpu"])
def test_compose_files_validate(files: tuple[str, ...]) -> None:
    result = docker_compose(*files, "config", "-q")
    assert result.returncode == 0, result.stderr


def resolved(*files: str, cwd: Path = REPO) -> dict[str, Any]:
    """The files as docker-compose resolves them (.env's values interpolated)."""
    result = docker_compose(*files, "config", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_four_engines_and_a_frontend_all_serving_the_configured_model() -> None:
    svc = services()
    assert set(svc) == {*ENGINES, "frontend"}
    for name in ENGINES:
        assert svc[name]["entrypoint"][:3] == ["vllm", "serve", "${MODEL}"], name


def test_only_the_cached_pair_uses_the_connector_and_the_shared_cache_volume() -> None:
    svc = services()
    for name in CACHED:
        args = " ".join(svc[name]["entrypoint"] + svc[name]["command"])
        assert '"kv_connector":"LMCacheFSConnector"' in args
        assert '"storage_path":"/kv"' in args
        assert mounts(svc[name]).get("/kv") == "rw"
    kv_sources = {v.rsplit(":/kv", 1)[0] for n in CACHED for v in svc[n]["volumes"] if ":/kv" in v}
    assert len(kv_sources) == 1, f"A and B must mount the same cache directory, got {kv_sources}"
    for name in PLAIN:
        assert "/kv" not in mounts(svc[name]), name
        assert "kv-transfer-config" not in " ".join(svc[name]["entrypoint"] + svc[name]["command"])
    # The page sees the cache only to count it.
    assert mounts(svc["frontend"]).get("/kv") == "ro"


def test_each_engine_reserves_its_own_gpu() -> None:
    svc = services(GPU_OVERRIDE)
    ids = []
    for name in ENGINES:
        (device,) = svc[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        (gpu,) = device["device_ids"]
        ids.append(gpu)
    assert len(set(ids)) == 4, ids
    assert all(re.fullmatch(r"\$\{GPU_[A-D]:-\d\}", gpu) for gpu in ids), ids


def test_engines_have_health_checks_and_the_frontend_waits_for_them() -> None:
    svc = services()
    for name in ENGINES:
        check = " ".join(svc[name]["healthcheck"]["test"])
        assert "http://localhost:8000/health" in check, name
    assert svc["frontend"]["depends_on"] == {n: {"condition": "service_healthy"} for n in ENGINES}


def test_the_token_reaches_the_engines_but_never_the_page() -> None:
    svc = services()
    for name in ENGINES:
        assert svc[name]["environment"]["HF_TOKEN"] == "${HF_TOKEN:-}"
    assert "HF_TOKEN" not in yaml.safe_dump(svc["frontend"])


def test_every_variable_the_compose_files_use_has_a_default_in_dot_env() -> None:
    used = set()
    for path in (COMPOSE, GPU_OVERRIDE, CPU_OVERRIDE, NFS_OVERRIDE):
        used |= set(re.findall(r"\$\{([A-Z_]+)", path.read_text()))
    defaults = env_file()
    assert used - set(defaults) == set()
    assert defaults["MODEL"] == "mistralai/Mistral-7B-Instruct-v0.2"
    assert defaults["HF_TOKEN"] == ""
    assert {"KV_STORE_DIR", "HF_CACHE_DIR", "GPU_A", "FRONTEND_PORT", "ENGINE_A_PORT"} <= set(defaults)


def test_the_image_is_built_on_a_pinned_official_vllm_image() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG VLLM_IMAGE=(\S+)$", dockerfile, re.M)
    assert base and re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", base.group(1))
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.M))
    svc = services()
    for name in ENGINES:  # the engine image (vLLM + lmcache-fs[cuda] + kernels), one for all four
        assert svc[name]["build"] == {"context": ".", "target": "engine"}, name
        assert svc[name]["image"] == "lmcache-fs-demo:latest", name
    # The page has a small image of its own (tests/test_dockerfile.py: no vLLM, no torch).
    assert svc["frontend"]["build"] == {"context": ".", "target": "page"}
    assert svc["frontend"]["image"] == "lmcache-fs-page:latest"
    assert {"engine", "page"} <= targets


@pytest.mark.parametrize(("config", "sequential"), [("engines.compose.yaml", False),
                                                    ("engines.compose-cpu.yaml", True)])
def test_the_page_configs_list_the_compose_engines(config: str, sequential: bool) -> None:
    # On GPUs each engine has its own: asked at once. On CPU they share the cores: one at a time.
    page = yaml.safe_load((REPO / "frontend" / config).read_text())
    hosts = {re.match(r"http://([^:]+):8000$", e["url"]).group(1): e["uses_cache"]
             for e in page["engines"]}
    assert hosts == {name: name in CACHED for name in ENGINES}
    assert page["cache_dir"] == "/kv" and page["sequential"] is sequential


def test_the_cpu_stack_has_no_gpu_no_hub_cache_and_serves_the_built_in_model_in_float32() -> None:
    svc = resolved(*CPU_STACK)["services"]
    for name in ENGINES:
        engine = svc[name]
        assert "deploy" not in engine, name  # no GPU reservation left from the GPU stack
        assert set(mounts(engine)) == ({"/kv"} if name in CACHED else set()), name
        assert engine["build"]["target"] == "engine-cpu" and engine["image"] == "lmcache-fs-demo-cpu:latest"
        args = engine["entrypoint"] + engine.get("command", [])
        assert args[0] == "engine-cpu-entrypoint" and "--dtype=float32" in args, name
        assert not any(a.startswith("--model") or "Mistral" in a for a in args), name
        assert ('"kv_connector":"LMCacheFSConnector"' in " ".join(args)) is (name in CACHED)
        assert engine["environment"]["OMP_NUM_THREADS"] == "1"
    # The same page image as on GPUs, told to ask the engines one at a time.
    assert svc["frontend"]["build"]["target"] == "page" and svc["frontend"]["image"] == "lmcache-fs-page:latest"
    assert svc["frontend"]["environment"]["LMCACHE_FS_DEMO_CONFIG"] \
        == "/opt/lmcache-fs/frontend/engines.compose-cpu.yaml"


def test_docker_compose_up_alone_still_gives_each_engine_its_gpu_and_the_model_cache() -> None:
    svc = resolved()["services"]
    for name in ENGINES:
        (device,) = svc[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia", name
        assert "/root/.cache/huggingface" in mounts(svc[name]), name
        assert svc[name]["build"]["target"] == "engine" and svc[name]["entrypoint"][:2] == ["vllm", "serve"]


@pytest.fixture()
def project_copy(tmp_path: Path) -> Path:
    """The compose files and .env in a scratch directory (to append a token to .env)."""
    for name in ("docker-compose.yml", "docker-compose.override.yml", ".env", "Dockerfile"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "docker", tmp_path / "docker")
    return tmp_path


def test_an_appended_token_goes_to_the_engines_only(project_copy: Path) -> None:
    # The README's `echo "HF_TOKEN=..." >> .env` must win over the empty default.
    with open(project_copy / ".env", "a") as env:
        env.write("HF_TOKEN=hf_sentinel_not_a_real_token\n")
    for files in [(), CPU_STACK]:
        svc = resolved(*files, cwd=project_copy)["services"]
        for name in ENGINES:
            assert svc[name]["environment"]["HF_TOKEN"] == "hf_sentinel_not_a_real_token"
        assert "hf_sentinel" not in yaml.safe_dump(svc["frontend"])


@pytest.mark.parametrize("stack_file", ["docker-compose.override.yml", "docker/compose.cpu.yml"],
                         ids=["gpu", "cpu"])
def test_nfs_override_mounts_the_export_with_prompt_discovery_options(
        project_copy: Path, stack_file: str) -> None:
    with open(project_copy / ".env", "a") as env:
        env.write("NFS_SERVER=10.0.0.5\nNFS_EXPORT=/exports/kv\n")
    # The README's command: the stack's two files, then the NFS override.
    stack = resolved("-f", "docker-compose.yml", "-f", stack_file, "-f", "docker/compose.nfs.yml",
                     cwd=project_copy)
    for name, mode in {"engine-a": "rw", "engine-b": "rw", "frontend": "ro"}.items():
        assert f"kv-nfs:/kv:{mode}" in stack["services"][name]["volumes"], name
    for name in PLAIN:
        assert not any("/kv" in v for v in stack["services"][name].get("volumes", [])), name
    assert all(("deploy" in stack["services"][name]) is (stack_file.endswith("override.yml"))
               for name in ENGINES)
    opts = stack["volumes"]["kv-nfs"]["driver_opts"]
    assert opts["type"] == "nfs" and opts["device"] == ":/exports/kv"
    assert {"addr=10.0.0.5", "lookupcache=positive", "hard"} <= set(opts["o"].split(","))


def test_nfs_override_without_a_server_fails_with_a_clear_message(project_copy: Path) -> None:
    result = docker_compose("-f", "docker-compose.yml", "-f", "docker/compose.nfs.yml", "config",
                            "-q", cwd=project_copy)
    assert result.returncode != 0
    assert "set NFS_SERVER in .env" in result.stderr
