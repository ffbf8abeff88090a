"""`docker compose up` of the CPU stack, for real: built and run here as a user without a GPU would.

``docker compose -f docker-compose.yml -f docker/compose.cpu.yml up --build`` from this
checkout, through Debian's docker.io and docker-compose 1.29: a dockerd of the checkout's own
where none answers (tests/docker_engine.py), stand-ins for the python base images that no
registry here serves (tests/base_image_standin.py), the project's images built through compose,
then four engines on SmolLM2-135M-Instruct (A and B with lmcache-fs on one host directory, C and
D plain) and the page. Build, start-up and first-answer times and the image sizes go to
``tests/artifacts/compose-cpu-timings.json``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from ask import EngineAnswer, ask_one
from base_image_standin import ensure_python_base_images
from compose_stack import (
    CPU_STACK,
    ComposeStack,
    check_ports_free,
    published_ports,
    stack_settings,
)
from demo_config import EngineConfig, document_catalog
from docker_engine import Docker, DockerError, DockerUnavailable, docker_engine
from engine_client import check_health, metric_sum
from launcher import CONNECTOR_NAME, free_port
from page_in_browser import ask_on_the_page, check_side_by_side_answers

from lmcache_fs.ops.inventory import namespace_dirs, scan_chunks

pytestmark = pytest.mark.engine

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
ENGINES = {"engine-a": ("A · lmcache-fs", "ENGINE_A_PORT", True),
           "engine-b": ("B · lmcache-fs", "ENGINE_B_PORT", True),
           "engine-c": ("C · plain vLLM", "ENGINE_C_PORT", False),
           "engine-d": ("D · plain vLLM", "ENGINE_D_PORT", False)}
CPU_IMAGE, PAGE_IMAGE = "lmcache-fs-demo-cpu:latest", "lmcache-fs-page:latest"
TOKEN = "hf_sentinel_compose_cpu_not_a_real_token"
CHUNK = 256  # lmcache-fs's default chunk_size
BUILD_TIMEOUT_S = 1500
START_TIMEOUT_S = 600
ANSWER_TOKENS = 32  # the page's default answer length


@dataclass
class CpuStack:
    docker: Docker
    compose: ComposeStack
    settings: dict[str, str]
    kv_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    run_engine: EngineConfig | None = None
    """The CPU image started with ``docker run`` beside the stack (:func:`start_docker_run`)."""

    def engine(self, service: str) -> EngineConfig:
        label, port_key, uses_cache = ENGINES[service]
        return EngineConfig(label, f"http://127.0.0.1:{self.settings[port_key]}", uses_cache)

    def chunk_count(self) -> int:
        return sum(1 for ns in namespace_dirs(self.kv_dir) for _ in scan_chunks(ns))


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    try:
        with docker_engine() as engine:
            yield engine
    except DockerUnavailable as exc:
        pytest.skip(str(exc))  # a CI run counts this as a failure (tests/conftest.py)


def _image_mb(docker: Docker, image: str) -> float:
    return int(docker.run("image", "inspect", "--format", "{{.Size}}", image).stdout) / 1e6


@pytest.fixture(scope="module")
def stack(docker: Docker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CpuStack]:
    """The CPU stack built and up, every engine healthy; logs kept and everything down after."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    work = tmp_path_factory.mktemp("compose-cpu")
    ports = {key: str(free_port()) for _, key, _ in ENGINES.values()} | {"FRONTEND_PORT": str(free_port())}
    settings = stack_settings(CPU_STACK, {**ports, "KV_STORE_DIR": str(work / "kv"),
                                          "HF_TOKEN": TOKEN}, work / "stack.env")
    check_ports_free(published_ports(CPU_STACK, settings))
    project = f"lmcfs-test-{uuid.uuid4().hex[:8]}"
    running = CpuStack(docker, ComposeStack(docker, project, CPU_STACK, work / "stack.env"),
                       settings, work / "kv")
    start = time.monotonic()
    try:
        ensure_python_base_images(docker)
    except DockerUnavailable as exc:
        pytest.skip(str(exc))
    running.timings["stand_in_images_s"] = time.monotonic() - start
    try:
        start = time.monotonic()
        running.compose.compose("build", timeout_s=BUILD_TIMEOUT_S)
        running.timings["build_s"] = time.monotonic() - start
        # The engines first, so that a crash is seen at once (`up` would wait for the page's
        # depends_on until its timeout), then the page: what one `up` does.
        start = time.monotonic()
        running.compose.compose("up", "-d", *ENGINES, timeout_s=120)
        running.compose.wait_healthy(list(ENGINES), START_TIMEOUT_S)
        running.compose.compose("up", "-d", timeout_s=120)
        running.timings["up_until_healthy_s"] = time.monotonic() - start
        running.timings["engine_cpu_image_mb"] = _image_mb(docker, CPU_IMAGE)
        running.timings["page_image_mb"] = _image_mb(docker, PAGE_IMAGE)
        # Started now, so that it boots while the first tests run (it is asked only in the last).
        running.run_engine = start_docker_run(running, f"{project}-docker-run", free_port())
        yield running
    finally:
        try:
            running.compose.save_logs(ARTIFACTS / "compose-cpu.log")
            logs = docker.run("logs", f"{project}-docker-run", check=False)
            (ARTIFACTS / "compose-cpu-docker-run.log").write_text(logs.stdout + logs.stderr)
        finally:
            docker.run("rm", "-f", f"{project}-docker-run", check=False)
            running.compose.compose("down", "--remove-orphans", timeout_s=300)
            (ARTIFACTS / "compose-cpu-timings.json").write_text(json.dumps(running.timings, indent=1))


@dataclass(frozen=True)
class DocumentRound:
    """One fresh copy of a long document and its question, asked of A, then B, then C."""

    context: str
    question: str
    answers: dict[str, EngineAnswer]
    b_loaded_tokens: float
    """What B's /metrics counted as loaded by lmcache-fs during its answer."""


def _ask(engine: EngineConfig, context: str, question: str) -> EngineAnswer:
    answer = ask_one(engine, context, question, ANSWER_TOKENS)
    assert not answer.error, answer.error
    return answer


def _loaded_tokens(engine: EngineConfig) -> float:
    return metric_sum(requests.get(engine.url + "/metrics", timeout=30).text,
                      "vllm:lmcache_fs_loaded_tokens_total")


def _wait_for_chunks(stack: CpuStack, at_least: int, timeout_s: float = 60.0) -> int:
    """Chunk files in the shared directory, once there are ``at_least``."""
    deadline = time.monotonic() + timeout_s
    while (count := stack.chunk_count()) < at_least:
        assert time.monotonic() < deadline, f"{count} chunk files after {timeout_s:.0f} s"
        time.sleep(0.5)
    return count


@pytest.fixture(scope="module")
def document_round(stack: CpuStack) -> DocumentRound:
    document = document_catalog()[0]  # the GPL-2, about 4,000 tokens
    context = f"[document {uuid.uuid4().hex[:12]}]\n{document.text}"
    question = document.questions[0].question  # "Who publishes this license?"
    answers = {"engine-a": _ask(stack.engine("engine-a"), context, question)}
    stack.timings["first_answer_ttft_s"] = answers["engine-a"].ttft_s or 0.0
    stack.timings["first_answer_total_s"] = answers["engine-a"].total_s or 0.0
    # Every whole chunk of A's prompt, before B asks (A's writer publishes in the background).
    chunks_after_a = _wait_for_chunks(stack, (answers["engine-a"].prompt_tokens or 0) // CHUNK)
    before = _loaded_tokens(stack.engine("engine-b"))
    answers["engine-b"] = _ask(stack.engine("engine-b"), context, question)
    loaded = _loaded_tokens(stack.engine("engine-b")) - before
    answers["engine-c"] = _ask(stack.engine("engine-c"), context, question)
    assert stack.chunk_count() == chunks_after_a  # B loaded, stored nothing new
    for service in ("engine-b", "engine-c"):
        stack.timings[f"{service}_ttft_s"] = answers[service].ttft_s or 0.0
    return DocumentRound(context, question, answers, loaded)


def _loaded_nearly_all(answer: EngineAnswer) -> bool:
    # Hits are whole chunks and leave the last token to compute: at most one chunk is recomputed.
    return (answer.shared_hit_tokens or 0) >= (answer.prompt_tokens or 0) - CHUNK > 0


def test_b_loads_the_document_a_stored_and_answers_as_plain_c_does(
        stack: CpuStack, document_round: DocumentRound) -> None:
    a, b, c = (document_round.answers[s] for s in ("engine-a", "engine-b", "engine-c"))
    assert (a.prompt_tokens or 0) > 4000
    assert a.shared_hit_tokens == 0 and c.shared_hit_tokens == 0
    # B met the document for the first time and loaded it from the shared volume.
    assert _loaded_nearly_all(b), (b.shared_hit_tokens, b.prompt_tokens)
    assert document_round.b_loaded_tokens == b.shared_hit_tokens
    assert (b.ttft_s or 0) < (c.ttft_s or 0)
    # float32 (docker/compose.cpu.yml): continuing from loaded KV gives the full prefill's answer.
    assert b.text == c.text == a.text, (a.text, b.text, c.text)
    assert "Free Software Foundation" in c.text


def test_the_token_from_dot_env_reaches_the_engines_and_never_the_page(stack: CpuStack) -> None:
    for service in ENGINES:
        assert stack.compose.environment(service)["HF_TOKEN"] == TOKEN, service
    page = stack.compose.inspect("frontend")
    assert TOKEN not in json.dumps(page)


def test_the_page_answers_side_by_side_with_four_engines_up(stack: CpuStack) -> None:
    url = f"http://127.0.0.1:{stack.settings['FRONTEND_PORT']}"
    check_side_by_side_answers(ask_on_the_page(url, ARTIFACTS / "compose-cpu-page.png"))


def start_docker_run(stack: CpuStack, name: str, port: int) -> EngineConfig:
    """``docker run`` of the CPU image as vLLM's image is run: no MODEL (the built-in one), the
    connector's settings, the shared directory mounted."""
    transfer = json.dumps({"kv_connector": CONNECTOR_NAME, "kv_role": "kv_both",
                           "kv_connector_extra_config": {"storage_path": "/kv"}})
    stack.docker.run("run", "-d", "--name", name, "--ipc=host",
                     "-p", f"127.0.0.1:{port}:8000", "-v", f"{stack.kv_dir}:/kv",
                     "-e", "OMP_NUM_THREADS=1", CPU_IMAGE,
                     "--dtype", "float32", "--kv-transfer-config", transfer)
    return EngineConfig(name, f"http://127.0.0.1:{port}", True)


def _wait_until_serving(stack: CpuStack, engine: EngineConfig,
                        timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check_health(engine, timeout=2.0).ok:
        state = stack.docker.run("inspect", "--format", "{{.State.Status}}", engine.label,
                                 check=False).stdout.strip()
        if state not in ("running", "created"):
            logs = stack.docker.run("logs", "--tail", "30", engine.label, check=False)
            raise DockerError(f"{engine.label} is {state or 'gone'}:\n{logs.stdout}{logs.stderr}")
        assert time.monotonic() < deadline, f"{engine.label} not serving after {timeout_s:.0f} s"
        time.sleep(2.0)


def _asks_again_and_loads(engine: EngineConfig, document_round: DocumentRound) -> None:
    """A fresh engine on the kept directory answers the document as plain C did, recomputing
    nothing but the last chunk."""
    answer = _ask(engine, document_round.context, document_round.question)
    assert _loaded_nearly_all(answer), (engine.label, answer.shared_hit_tokens, answer.prompt_tokens)
    assert answer.text == document_round.answers["engine-c"].text, (engine.label, answer.text)


def test_down_keeps_the_chunks_and_the_next_up_loads_them_without_recomputing(
        stack: CpuStack, document_round: DocumentRound) -> None:
    chunks = stack.chunk_count()
    stack.compose.save_logs(ARTIFACTS / "compose-cpu-first-up.log")
    stack.compose.compose("down", timeout_s=300)
    assert stack.chunk_count() == chunks > 0
    start = time.monotonic()
    stack.compose.compose("up", "-d", "engine-b", timeout_s=120)
    stack.compose.wait_healthy(["engine-b"], START_TIMEOUT_S)
    stack.timings["second_up_engine_b_until_healthy_s"] = time.monotonic() - start
    _asks_again_and_loads(stack.engine("engine-b"), document_round)
    assert stack.chunk_count() == chunks


def test_docker_run_of_the_cpu_image_serves_the_built_in_model_and_loads_the_chunks(
        stack: CpuStack, document_round: DocumentRound) -> None:
    assert stack.run_engine is not None
    _wait_until_serving(stack, stack.run_engine)
    _asks_again_and_loads(stack.run_engine, document_round)
