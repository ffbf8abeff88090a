"""Hybrid attention end to end: a Gemma-3-style model on real vLLM CPU engines, hybrid manager on.

The model (tests/hybrid_models.py) has four sliding-window layers (window 256)
and two full-attention layers: vLLM gives it three KV cache groups (sliding,
sliding, full). Chunks of 512 tokens: a sliding-window group's file holds only
the last two of a chunk's four blocks (those inside the window at the chunk's
end), a full group's file all four.

Engines for the module: ``plain`` (no connector: reference tokens and
logprobs), ``a`` (stores and loads) and ``b`` (started after A's first
stores, so its first hit can only come from A's files; chunked prefill at 512
tokens). Each test uses fresh random prompts.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from engines import EngineProcess
from hybrid_models import (
    GEMMA3_WINDOW,
    assert_same_output,
    build_hybrid_model,
    by_chunk,
    files_by_group,
    generate_with_logprobs,
    kv_capacity,
    wait_for_files,
)

from lmcache_fs.ops.inspection import read_header

pytestmark = pytest.mark.engine

CHUNK = 512
BLOCK = 128
GROUPS = 3  # sliding, sliding, full
PROMPT_LEN = 1500  # two whole chunks and a tail; six windows
FULL_HIT = 2 * CHUNK
SLIDING_HELD_BLOCKS = (CHUNK // BLOCK) - (CHUNK - GEMMA3_WINDOW + 1) // BLOCK  # 2 of 4


def _connector(storage: Path) -> dict:
    return {"kv_connector": "LMCacheFSConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"storage_path": str(storage), "chunk_size": CHUNK}}


@pytest.fixture(scope="module")
def gemma3(synthetic_model) -> Path:
    return build_hybrid_model(synthetic_model.parent / "hybrid-gemma3", "gemma3", synthetic_model)


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hybrid-kv")


_rng = random.Random(1818)


def _prompt(n: int = PROMPT_LEN) -> list[int]:
    return [_rng.randrange(3, 250) for _ in range(n)]


@pytest.fixture(scope="module")
def engines(gemma3, storage, tmp_path_factory):
    """plain and a; b joins in :func:`first_hit` once a has stored a prompt."""
    logs = tmp_path_factory.mktemp("hybrid-logs")
    started: dict[str, EngineProcess] = {}
    try:
        started["plain"] = EngineProcess(gemma3, logs / "plain.log")
        started["a"] = EngineProcess(gemma3, logs / "a.log", _connector(storage))
        prompt = _prompt()
        started["a"].generate([prompt])
        wait_for_files(storage, GROUPS * (PROMPT_LEN // CHUNK))
        started["b"] = EngineProcess(gemma3, logs / "b.log", _connector(storage),
                                     max_num_batched_tokens=512)
        started["first_prompt"] = prompt  # type: ignore[assignment]
        yield started
    finally:
        for name, engine in started.items():
            if isinstance(engine, EngineProcess):
                engine.close()


def _stored_by_a(engines, storage: Path, prompt: list[int]) -> dict[tuple[int, int], Path]:
    """A stores ``prompt``; its files by (group, chunk index)."""
    before = files_by_group(storage)
    engines["a"].generate([prompt])
    files = wait_for_files(storage, len(before) + GROUPS * (PROMPT_LEN // CHUNK))
    return by_chunk({path: group for path, group in files.items() if path not in before})


def test_hybrid_manager_stays_on_and_capacity_is_plain_vllms(engines):
    # (b differs from both: its token budget of 512 changes vLLM's sliding-window pool sizing)
    assert kv_capacity(engines["a"]) == kv_capacity(engines["plain"])
    assert "Turning off hybrid kv cache manager" not in engines["a"].log_text()


def test_each_group_has_its_files_and_sliding_ones_hold_only_the_window(engines, storage):
    by_group: dict[int, list[Path]] = {}
    for path, group in files_by_group(storage).items():
        by_group.setdefault(group, []).append(path)
    assert sorted(by_group) == list(range(GROUPS))
    blocks = {group: {read_header(p).shape[1] for p in paths} for group, paths in by_group.items()}
    # vLLM orders the groups sliding, sliding, full
    assert blocks == {0: {SLIDING_HELD_BLOCKS}, 1: {SLIDING_HELD_BLOCKS}, 2: {CHUNK // BLOCK}}


def test_fresh_engine_loads_what_another_stored(engines):
    prompt = engines["first_prompt"]
    got = generate_with_logprobs(engines["b"], prompt)
    assert got["num_cached_tokens"] == FULL_HIT
    assert_same_output(got, generate_with_logprobs(engines["plain"], prompt))


def test_shared_prefix_gets_a_partial_hit(engines, storage):
    prompt = _prompt()
    before = files_by_group(storage)
    engines["a"].generate([prompt])
    wait_for_files(storage, len(before) + GROUPS * (PROMPT_LEN // CHUNK))
    other = prompt[:CHUNK + 100] + _prompt(PROMPT_LEN - CHUNK - 100)
    got = generate_with_logprobs(engines["b"], other)
    assert got["num_cached_tokens"] == CHUNK  # the first chunk only: the second differs
    assert_same_output(got, generate_with_logprobs(engines["plain"], other))


def test_chunks_stored_under_chunked_prefill_load_elsewhere(engines, storage):
    prompt = _prompt()
    before = files_by_group(storage)
    engines["b"].generate([prompt])  # b prefills 512 tokens per step
    wait_for_files(storage, len(before) + GROUPS * (PROMPT_LEN // CHUNK))
    engines["a"].reset_prefix_cache()
    got = generate_with_logprobs(engines["a"], prompt)
    assert got["num_cached_tokens"] == FULL_HIT
    assert_same_output(got, generate_with_logprobs(engines["plain"], prompt))


def test_a_missing_window_file_shortens_the_hit_to_what_every_group_can_serve(engines, storage):
    # As after eviction of one group's file of the chunk whose window a full hit needs.
    prompt = _prompt()
    _stored_by_a(engines, storage, prompt)[(1, 1)].unlink()  # a sliding group's file of chunk 1
    engines["b"].reset_prefix_cache()
    got = generate_with_logprobs(engines["b"], prompt)
    assert got["num_cached_tokens"] == CHUNK  # chunk 0's window is whole: a hit of one chunk
    assert_same_output(got, generate_with_logprobs(engines["plain"], prompt))


def test_a_damaged_file_is_recomputed_with_the_same_tokens(engines, storage):
    prompt = _prompt()
    with open(_stored_by_a(engines, storage, prompt)[(0, 1)], "r+b") as f:  # flip one bit in the data of a window file
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 0x01]))
    engines["b"].reset_prefix_cache()
    got = generate_with_logprobs(engines["b"], prompt)
    assert_same_output(got, generate_with_logprobs(engines["plain"], prompt))
    assert "recomputing from there" in engines["b"].log_text()
