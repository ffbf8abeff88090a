"""Gated DeltaNet hybrids end to end: a tiny Qwen3-Next on real vLLM CPU engines.

The model (tests/hybrid_models.py, ``qwen3_next``, bf16: the CPU build's GDN path
needs it) alternates linear-attention and full-attention layers: vLLM gives it
a state group and a full-attention group, both of 256-token blocks (the state
page padded to the attention page), and caches states only where a prefill
step ends on a block boundary that it keeps (``mamba_cache_mode="align"``).
lmcache-fs stores each group's file of a chunk, the state only where vLLM handed
one over; a hit needs the state at its end.

Engines for the module, started together (B is running when A stores):

- ``plain``: no connector, the reference;
- ``a``: lmcache-fs, one prefill step per prompt: vLLM keeps one state per
  prompt, at its last block boundary below the last token;
- ``b``: lmcache-fs, chunked prefill of 256 tokens a step and
  ``prefix_cache_retention_interval`` 256: a state at every chunk's end. It is
  killed while it stores, in the last test.

Where the loading engine's computation after the hit is the writer's own (the
same steps from the same state), its logprobs must be the writer's exactly;
against plain vLLM, where the steps differ, bf16 rounding of another step
split parts logprobs by a few thousandths (plain vLLM alone, chunked prefill
against one step on 4,000 tokens: 3.9e-3), so tokens must match and logprobs
stay within ``BF16_SPLIT_TOLERANCE``.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch
from cachedir import flip_byte, read_chunk_file
from engines import EngineProcess
from hybrid_models import (
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

CHUNK = 256  # lmcache-fs's default, and vLLM's block size for this model
STATE, FULL = 0, 1  # vLLM's groups: the linear-attention states, the full attention
ATTENTION_SHAPE = (2, 1, 2, 256, 128)  # layers, blocks, KV heads, tokens, K and V (bf16)
STATE_SHAPE = (2, 1, 1, 1, 68608)  # layers, the block at the chunk's end, its state bytes
BF16_SPLIT_TOLERANCE = 2e-2
NOTES_FILE = "gdn-engines.json"  # what the tests measured (the notes fixture, conftest.py)
MID_CHUNK = 4 * CHUNK + 76  # a prompt that ends mid-chunk
EXACT = 4 * CHUNK  # a prompt of exactly four chunks

_rng = random.Random(2525)


def _prompt(n: int) -> list[int]:
    return [_rng.randrange(3, 250) for _ in range(n)]


def _connector(storage: Path) -> dict:
    return {"kv_connector": "LMCacheFSConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"storage_path": str(storage)}}


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gdn-kv")


@pytest.fixture(scope="module")
def engines(synthetic_model, storage, tmp_path_factory):
    model = build_hybrid_model(synthetic_model.parent / "hybrid-qwen3_next", "qwen3_next",
                               synthetic_model)
    logs = tmp_path_factory.mktemp("gdn-logs")
    started: dict[str, EngineProcess] = {}
    try:
        started["plain"] = EngineProcess(model, logs / "plain.log", dtype="bfloat16")
        started["a"] = EngineProcess(model, logs / "a.log", _connector(storage), dtype="bfloat16")
        started["b"] = EngineProcess(model, logs / "b.log", _connector(storage), dtype="bfloat16",
                                     max_num_batched_tokens=CHUNK,
                                     engine_args={"prefix_cache_retention_interval": CHUNK})
        yield started
    finally:
        for engine in started.values():
            engine.close()


def _store(engine: EngineProcess, storage: Path, prompt: list[int],
           files: int) -> tuple[dict, dict[tuple[int, int], Path]]:
    """``engine`` answers ``prompt``; its answer and the ``files`` new files, by (group, chunk)."""
    before = files_by_group(storage)
    answer = generate_with_logprobs(engine, prompt)
    found = wait_for_files(storage, len(before) + files)
    return answer, by_chunk({p: g for p, g in found.items() if p not in before})


def _within_split_tolerance(got: dict, plain: dict) -> float:
    """Assert plain vLLM's tokens and logprobs within bf16's step-split rounding; the gap."""
    assert got["token_ids"] == plain["token_ids"]
    assert got["logprobs"] == pytest.approx(plain["logprobs"], abs=BF16_SPLIT_TOLERANCE)
    return max(abs(a - b) for a, b in zip(got["logprobs"], plain["logprobs"]))


def _stored_again(path: Path, timeout_s: float = 60) -> None:
    """Wait until a chunk file is published at ``path`` (stores run in the background)."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} was not stored again"
        time.sleep(0.1)


def _read_whole(path: Path) -> None:
    """Read and check a chunk file as a loader would (raises ChunkFileError)."""
    header = read_header(path)
    read_chunk_file(path, torch.empty(header.shape, dtype=header.dtype))


def test_capacity_is_plain_vllms_and_the_hybrid_manager_stays_on(engines):
    plain = kv_capacity(engines["plain"])
    assert kv_capacity(engines["a"]) == kv_capacity(engines["b"]) == plain
    for name in ("a", "b"):
        assert "Turning off hybrid kv cache manager" not in engines[name].log_text()


def test_b_already_running_loads_what_a_stored_with_plain_vllms_tokens_and_logprobs(
        engines, storage):
    prompt = _prompt(MID_CHUNK)
    stored, files = _store(engines["a"], storage, prompt, files=4 + 1)
    # Every chunk's attention; one state: vLLM kept the one after 1,024 tokens (A's step).
    assert sorted(files) == [(STATE, 3), (FULL, 0), (FULL, 1), (FULL, 2), (FULL, 3)]
    assert read_header(files[STATE, 3]).shape == STATE_SHAPE
    assert read_header(files[STATE, 3]).dtype == torch.int8
    assert {read_header(files[FULL, c]).shape for c in range(4)} == {ATTENTION_SHAPE}
    got = generate_with_logprobs(engines["b"], prompt)
    assert got["num_cached_tokens"] == 4 * CHUNK  # counted by vLLM as a hit
    plain = generate_with_logprobs(engines["plain"], prompt)
    # B computes the last 76 tokens from the loaded state as plain vLLM from its own.
    assert_same_output(got, plain)
    assert_same_output(stored, plain)


def test_a_one_step_prefill_ending_late_in_a_block_keeps_no_state_so_attention_alone_is_no_hit(
        engines, storage):
    # vLLM ends the step at the last token rounded down to 128 (here 896, mid-block): no state
    # at a block boundary, so none is stored, and the attention files are never loaded alone.
    before = set(files_by_group(storage))
    prompt = _prompt(EXACT - 24)
    _store(engines["a"], storage, prompt, files=3)
    time.sleep(1)  # (the state group's writer would have published with the attention's)
    new = {p: g for p, g in files_by_group(storage).items() if p not in before}
    assert sorted(by_chunk(new)) == [(FULL, 0), (FULL, 1), (FULL, 2)]
    got = generate_with_logprobs(engines["b"], prompt)
    assert got["num_cached_tokens"] == 0
    _within_split_tolerance(got, generate_with_logprobs(engines["plain"], prompt))


def test_chunked_prefill_stores_a_state_per_chunk_and_a_prompt_of_exactly_k_chunks_hits_below_its_last_token(
        engines, storage, notes):
    prompt = _prompt(EXACT)
    stored, files = _store(engines["b"], storage, prompt, files=4 + 4)
    assert sorted(files) == [(group, c) for group in (STATE, FULL) for c in range(4)]
    got = generate_with_logprobs(engines["a"], prompt)
    # The state after all 1,024 tokens is on disk, but the last token must be computed.
    assert got["num_cached_tokens"] == 3 * CHUNK
    assert_same_output(got, stored)  # A's steps from 768 on are B's
    notes["exact k chunks: gap to plain"] = _within_split_tolerance(
        got, generate_with_logprobs(engines["plain"], prompt))


def test_a_missing_state_file_shortens_the_hit_and_is_stored_again(engines, storage, notes):
    prompt = _prompt(MID_CHUNK)
    stored, files = _store(engines["b"], storage, prompt, files=4 + 4)
    files[STATE, 3].unlink()  # as after eviction
    got = generate_with_logprobs(engines["a"], prompt)
    assert got["num_cached_tokens"] == 3 * CHUNK  # the state before it
    assert_same_output(got, stored)
    notes["missing state: gap to plain"] = _within_split_tolerance(
        got, generate_with_logprobs(engines["plain"], prompt))
    # A computed the chunk and vLLM kept its state (A's last block boundary): stored again.
    _stored_again(files[STATE, 3])
    _read_whole(files[STATE, 3])


def test_a_damaged_state_file_is_recomputed_with_the_same_tokens(engines, storage):
    prompt = _prompt(MID_CHUNK)
    stored, files = _store(engines["b"], storage, prompt, files=4 + 4)
    damaged = files[STATE, 3]
    flip_byte(damaged, 4096 + 1000)  # inside the recurrent state: the checksum fails
    got = generate_with_logprobs(engines["a"], prompt)
    # The load fails whole (several KV cache groups: vLLM takes failures per request) and
    # vLLM recomputes the request; looked up again, the quarantined state is no hit.
    assert got["num_cached_tokens"] == 3 * CHUNK
    assert_same_output(got, stored)
    log = engines["a"].log_text()
    assert f"chunk {damaged.stem[:16]} unusable (checksum mismatch" in log
    _stored_again(damaged)  # (quarantined, then stored again from A's computation)
    _read_whole(damaged)


def test_a_writer_killed_mid_store_leaves_whole_files_and_the_reader_answers_like_plain(
        engines, storage, notes):
    prompt = _prompt(16 * CHUNK - 100)  # 15 chunks, a step (and a state) per chunk on B
    chunks = len(prompt) // CHUNK
    before = set(files_by_group(storage))
    engines["b"].send("generate", prompts=[prompt], max_tokens=8)
    deadline = time.monotonic() + 120
    while not set(files_by_group(storage)) - before:
        assert time.monotonic() < deadline, "B stored nothing of the prompt"
        time.sleep(0.005)
    engines["b"].kill()
    stored = by_chunk({p: g for p, g in files_by_group(storage).items() if p not in before})
    assert 0 < len(stored) < 2 * chunks  # killed mid-store
    for path in stored.values():  # every file under a chunk's name is whole
        _read_whole(path)
    # The hit: the last chunk whose state is there, with every attention chunk up to it.
    whole = next((c + 1 for c in reversed(range(chunks)) if (STATE, c) in stored
                  and all((FULL, earlier) in stored for earlier in range(c + 1))), 0)
    got = generate_with_logprobs(engines["a"], prompt)
    assert got["num_cached_tokens"] == whole * CHUNK
    gap = _within_split_tolerance(got, generate_with_logprobs(engines["plain"], prompt))
    notes["killed mid-store"] = {"files of the prompt": len(stored), "of": 2 * chunks,
                                 "hit tokens": whole * CHUNK, "gap to plain": gap}
