"""End to end on a real chat model: SmolLM2-135M-Instruct through /v1/chat/completions.

Three OpenAI API servers for the module, started as the demo starts them
(launcher.engine_command): ``plain`` (no connector: the reference answers),
``a`` and ``b`` (lmcache-fs on one shared directory). Requests go through the
model's own chat template and BPE tokenizer, so chunk keys come from real
prompts, and hits are read from each engine's /metrics. Before every request to
B its own prefix cache is emptied (vLLM's dev endpoint), so each hit counted on
B came from a chunk file.

Served in float32: greedy answers are compared token for token, and in bf16
the answer of an engine that loaded a prefix may differ from one that computed
it (FLOAT32_WHY says what was seen).
"""

from __future__ import annotations

import os
import time

import pytest
import requests
from demo_config import sample_documents
from engine_client import cache_counters
from launcher import EngineSpec, ProcessGroup, engine_command, free_port, wait_until_healthy

pytestmark = pytest.mark.engine

CHUNK = 256  # lmcache-fs's default chunk_size
BLOCK = 128  # vLLM's CPU block size: hits are whole blocks
# A small context keeps the float32 KV pool small (46 KB a token); the longest prompt
# here (GPL-2 with the chat template, a question and a turn) is about 4,300 tokens.
MAX_MODEL_LEN = 5120
FLOAT32_WHY = (
    "float32, because bf16 is not exact here: a prefill that continues from loaded KV computes "
    "the new tokens in smaller matrix products, against the loaded prefix, than one prefill "
    "over the whole prompt, so its sums run in another order. In bf16 that rounding can flip a "
    "near-tied greedy pick: run in bfloat16, the second case's answer on B parted from plain "
    "vLLM's at its 22nd token (the other two matched); in float32 all three match.")
ANSWER_TOKENS = 24
DOCUMENT = sample_documents()["GNU General Public License, version 2"]  # about 4,050 tokens
# The follow-up conversation has a shorter document of its own (about 2,000 tokens),
# so no chunk of it exists before its first turn.
SHORT_DOCUMENT = sample_documents()["Python: Format String Syntax"][:8000]


@pytest.fixture(scope="module")
def engines(real_model, tmp_path_factory, artifacts_dir):
    storage = tmp_path_factory.mktemp("real-model-kv")
    specs = {name: EngineSpec(name, name, free_port(), uses_cache=name != "plain")
             for name in ("plain", "a", "b")}
    group = ProcessGroup()
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1",  # for /reset_prefix_cache
           # one compute thread for every engine: plain and connector engines then sum in
           # the same order (vLLM's CPU build gives a connector engine one more core)
           "VLLM_CPU_OMP_THREADS_BIND": str((os.cpu_count() or 1) - 1)}
    try:
        for name, spec in specs.items():
            group.start(name, engine_command(real_model, spec, storage, dtype="float32",
                                             max_model_len=MAX_MODEL_LEN),
                        artifacts_dir / f"real-model-{name}.log", env)
        wait_until_healthy(list(specs.values()), group, timeout_s=600, say=lambda _: None)
        yield specs, real_model.name
    finally:
        group.stop_all()


def _chat(engines, name: str, messages: list[dict[str, str]]) -> dict:
    """One greedy chat request; returns its token ids, text, prompt size and shared hits."""
    specs, model = engines
    spec = specs[name]
    if name != "plain":  # only chunk files can give a hit now
        assert requests.post(f"{spec.url}/reset_prefix_cache", timeout=60).json()["success"]
    before = cache_counters(spec.as_config())
    response = requests.post(f"{spec.url}/v1/chat/completions", timeout=600, json={
        "model": model, "messages": messages, "max_tokens": ANSWER_TOKENS,
        "temperature": 0.0, "return_token_ids": True})
    assert response.status_code == 200, response.text
    body = response.json()
    choice = body["choices"][0]
    return {"tokens": choice["token_ids"], "text": choice["message"]["content"],
            "prompt_tokens": body["usage"]["prompt_tokens"],
            "shared_hits": (cache_counters(spec.as_config()) - before).shared_hit_tokens}


def _question(document: str, question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{document}\n\nQuestion: {question}"}]


def _stored_prefix(prompt_tokens: int) -> int:
    """Tokens of a prompt that a reader can load: whole chunks, whole blocks, never the last."""
    return min(prompt_tokens // CHUNK * CHUNK, (prompt_tokens - 1) // BLOCK * BLOCK)


def _wait_for_hit(engines, name: str, messages: list[dict[str, str]], expected: int) -> dict:
    """Ask until the writer's chunks are all published (they are written in the background)."""
    deadline = time.monotonic() + 60
    while True:
        got = _chat(engines, name, messages)
        if got["shared_hits"] >= expected or time.monotonic() > deadline:
            return got
        time.sleep(1)


def test_a_fresh_engine_answers_like_plain_vllm_from_the_chunks_another_stored(engines):
    messages = _question(DOCUMENT, "Who publishes this license?")
    reference = _chat(engines, "plain", messages)
    stored = _chat(engines, "a", messages)
    assert stored["shared_hits"] == 0  # nothing of this document was in the directory
    assert stored["tokens"] == reference["tokens"]
    assert 3800 < reference["prompt_tokens"] < MAX_MODEL_LEN

    loaded = _wait_for_hit(engines, "b", messages, _stored_prefix(reference["prompt_tokens"]))
    assert loaded["shared_hits"] == _stored_prefix(reference["prompt_tokens"])
    assert loaded["tokens"] == reference["tokens"], FLOAT32_WHY
    assert "Free Software Foundation" in reference["text"]  # a real model's answer


def test_a_second_question_asked_first_on_b_loads_the_documents_chunks(engines):
    # the document's chunks are in the directory (A stored them with the first question)
    first = _wait_for_hit(engines, "b", _question(DOCUMENT, "Who publishes this license?"), 1)
    second = _question(DOCUMENT, "Does this license come with a warranty for the program?")
    reference = _chat(engines, "plain", second)
    got = _chat(engines, "b", second)
    # The two prompts part only at the question: every whole chunk before it loads.
    assert _stored_prefix(first["prompt_tokens"]) - CHUNK <= got["shared_hits"] \
        <= _stored_prefix(first["prompt_tokens"])
    assert got["shared_hits"] % CHUNK == 0 and got["shared_hits"] >= 3 * 1024
    assert got["tokens"] == reference["tokens"], FLOAT32_WHY


def test_a_follow_up_turn_loads_the_earlier_turns_prefix_from_the_shared_directory(engines):
    turn_one = _question(SHORT_DOCUMENT, "How do you include a literal brace character?")
    first = _chat(engines, "a", turn_one)  # A answers the first turn and stores its prompt
    assert first["shared_hits"] == 0
    turn_two = turn_one + [{"role": "assistant", "content": first["text"]},
                           {"role": "user", "content": "Give an example."}]
    reference = _chat(engines, "plain", turn_two)
    got = _wait_for_hit(engines, "b", turn_two, _stored_prefix(first["prompt_tokens"]))
    assert reference["prompt_tokens"] > first["prompt_tokens"] + ANSWER_TOKENS // 2
    assert got["shared_hits"] == _stored_prefix(first["prompt_tokens"])
    assert got["tokens"] == reference["tokens"], FLOAT32_WHY
