"""End to end on real vLLM CPU engines in separate processes sharing one directory.

Three engines for the whole module: ``plain`` (no connector: the reference
tokens), ``a`` (connector, loading whole chunks before the forward pass) and
``b`` (connector, loading layer by layer during it, the default; chunked
prefill at 512 tokens).
Each prompt is fresh random tokens, so no test depends on another's files.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from cachedir import read_chunk_file, wait_for_count
from engines import EngineProcess

from lmcache_fs.ops.inspection import read_header
from lmcache_fs.storage.layout import is_temporary

pytestmark = pytest.mark.engine

CHUNK = 256
BLOCK = 128  # vLLM's CPU default block size
# Long enough for several chunks, short enough that a random model's next token still
# depends on the whole context (over thousands of random tokens it settles on one token,
# which would make "same tokens" a weak check).
PROMPT_LEN = 1200
FULL_HIT = min(PROMPT_LEN // CHUNK * CHUNK, (PROMPT_LEN - 1) // BLOCK * BLOCK)  # 1024
# The per-request "hit N/M tokens" line these tests read is DEBUG (vLLM's periodic
# "KV Transfer metrics" line is the INFO summary); vLLM's handler filters by its level too.
DEBUG_LOGS = {"LMCACHE_FS_LOG_LEVEL": "DEBUG", "VLLM_LOGGING_LEVEL": "DEBUG"}


def _connector(storage: Path, **settings: object) -> dict:
    return {"kv_connector": "LMCacheFSConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"storage_path": str(storage), "chunk_size": CHUNK,
                                          **settings}}


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared-kv")


@pytest.fixture(scope="module")
def engines(synthetic_model, storage, tmp_path_factory):
    logs = tmp_path_factory.mktemp("engine-logs")
    started: dict[str, EngineProcess] = {}
    try:
        started["plain"] = EngineProcess(synthetic_model, logs / "plain.log")
        started["a"] = EngineProcess(synthetic_model, logs / "a.log",
                                     _connector(storage, layerwise_load=False), env=DEBUG_LOGS)
        started["b"] = EngineProcess(synthetic_model, logs / "b.log", _connector(storage),
                                     max_num_batched_tokens=512, env=DEBUG_LOGS)
        yield started
    finally:
        for engine in started.values():
            engine.close()


_rng = random.Random(1234)


def _prompt(n: int = PROMPT_LEN) -> list[int]:
    return [_rng.randrange(3, 250) for _ in range(n)]


def _chunk_files(storage: Path) -> list[Path]:
    # (pathlib's glob also matches dot files: a writer's temporary would be listed, then vanish)
    return sorted(p for p in storage.glob("*/??/*.safetensors")
                  if not is_temporary(p.name))


def _wait_for_chunks(storage: Path, count: int) -> list[Path]:
    return wait_for_count(lambda: _chunk_files(storage), count)


def _files_of(storage: Path, prompt_files_before: set[Path]) -> list[Path]:
    return sorted(set(_chunk_files(storage)) - prompt_files_before)


def test_fresh_engine_loads_the_prefix_another_engine_stored(engines, storage):
    prompt = _prompt()
    reference = engines["plain"].generate([prompt])[0]
    before = len(_chunk_files(storage))
    stored = engines["a"].generate([prompt])[0]
    assert stored["num_cached_tokens"] == 0
    _wait_for_chunks(storage, before + PROMPT_LEN // CHUNK)

    loaded = engines["b"].generate([prompt])[0]
    assert loaded["num_cached_tokens"] == FULL_HIT
    assert loaded["token_ids"] == reference["token_ids"] == stored["token_ids"]
    log = engines["b"].log_text()
    assert f"hit {FULL_HIT}/{PROMPT_LEN} tokens" in log
    assert "loads layer by layer into the cache" in log and "engine waited" in log


def test_prompt_sharing_only_a_prefix_hits_its_whole_chunks(engines, storage):
    prompt = _prompt()
    before = len(_chunk_files(storage))
    engines["a"].generate([prompt])
    _wait_for_chunks(storage, before + PROMPT_LEN // CHUNK)
    shared = 600  # 2 whole chunks and part of a third
    other = prompt[:shared] + _prompt(PROMPT_LEN - shared)
    engines["b"].reset_prefix_cache()
    got = engines["b"].generate([other])[0]
    assert got["num_cached_tokens"] == shared // CHUNK * CHUNK
    assert got["token_ids"] == engines["plain"].generate([other])[0]["token_ids"]


def test_chunks_stored_under_chunked_prefill_load_correctly(engines, storage):
    prompt = _prompt()
    before = len(_chunk_files(storage))
    engines["b"].generate([prompt])  # b prefills 512 tokens per step
    _wait_for_chunks(storage, before + PROMPT_LEN // CHUNK)
    engines["a"].reset_prefix_cache()
    got = engines["a"].generate([prompt])[0]
    assert got["num_cached_tokens"] == FULL_HIT
    assert got["token_ids"] == engines["plain"].generate([prompt])[0]["token_ids"]
    assert "loads whole chunks" in engines["a"].log_text()


def test_corrupted_and_truncated_chunks_are_recomputed_not_loaded(engines, storage):
    prompt = _prompt()
    before = set(_chunk_files(storage))
    engines["a"].generate([prompt])
    _wait_for_chunks(storage, len(before) + PROMPT_LEN // CHUNK)
    by_index = {int(read_header(p).metadata["chunk_index"]): p
                for p in _files_of(storage, before)}
    with open(by_index[1], "r+b") as f:  # flip one bit in the data of chunk 1
        f.seek(8192)
        byte = f.read(1)
        f.seek(8192)
        f.write(bytes([byte[0] ^ 0x01]))
    with open(by_index[3], "r+b") as f:  # and cut chunk 3 short
        f.truncate(by_index[3].stat().st_size // 2)

    engines["b"].reset_prefix_cache()
    got = engines["b"].generate([prompt])[0]
    assert got["token_ids"] == engines["plain"].generate([prompt])[0]["token_ids"]
    log = engines["b"].log_text()
    assert "checksum mismatch" in log and "recomputing from there" in log
    # Only the chunk before the damaged one counts as loaded.
    assert f"hit {CHUNK}/{PROMPT_LEN} tokens" in log


def test_two_engines_storing_the_same_prompts_at_once_leave_only_valid_files(engines, storage):
    prompts = [_prompt(), _prompt()]
    before = set(_chunk_files(storage))
    engines["a"].send("generate", prompts=prompts, max_tokens=4)
    engines["b"].send("generate", prompts=prompts, max_tokens=4)
    outputs_a = engines["a"].receive()["outputs"]
    outputs_b = engines["b"].receive()["outputs"]
    assert [o["token_ids"] for o in outputs_a] == [o["token_ids"] for o in outputs_b]

    new_files = _files_of(storage, before)
    assert len(new_files) >= len(prompts) * (PROMPT_LEN // CHUNK) - 2  # writers may still finish
    new_files = _wait_for_chunks(storage, len(before) + len(prompts) * (PROMPT_LEN // CHUNK))
    for path in _files_of(storage, before):
        header = read_header(path)
        out = torch.empty(header.shape, dtype=header.dtype)
        read_chunk_file(path, out, {"key": path.stem})  # raises on any defect
    assert not [p for p in storage.glob("*/??/.*") if is_temporary(p.name)], "temporaries left behind"
