"""Tensor parallelism end to end: vLLM API servers with ``tensor_parallel_size=2`` on one directory.

The real model of the other engine tests, SmolLM2-135M, cannot be split over two
ranks: it has 9 attention heads, and vLLM needs a multiple of the TP size
("Total number of attention heads (9) must be divisible by tensor parallel size
(2)"). These tests serve the synthetic model (4 attention heads, 2 KV heads: one
per rank) in float32, where plain vLLM's tokens are an exact reference.

Each rank stores its own shard of every chunk: one file per chunk and rank, each
rank in a namespace of its own (``tp_rank`` 0 or 1 of ``tp_size`` 2). Four engine
starts in all:

1. ``plain``, TP=2 without a connector, answers every prompt below, then stops;
2. ``a`` and ``b``, TP=2 with lmcache-fs on one directory, up for the module: A
   prefills 512 tokens a step (chunked prefill) and loads whole chunks
   (``layerwise_load: false``); B prefills a prompt in one step and loads layer by
   layer. A is killed (SIGKILL) while it stores, in the test of that name;
3. ``c``, TP=1 on the same directory, beside B.

The tests run in file order and share the engines and the directory.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import requests
import torch
from cachedir import flip_byte, read_chunk_file
from engine_client import metric_sum
from engines import served, start_served
from launcher import EngineSpec, ProcessGroup, wait_until_healthy

from lmcache_fs.ops.inspection import read_header
from lmcache_fs.ops.inventory import namespace_dirs, scan_chunks
from lmcache_fs.storage.manifest import read_manifest

pytestmark = pytest.mark.engine

CHUNK, BLOCK = 256, 128  # lmcache-fs's default chunk size, vLLM's CPU block size
TP = 2
RANKS = ((TP, 0), (TP, 1))  # (tp_size, tp_rank) of the TP=2 engines' namespaces
ANSWER_TOKENS = 8
# float32 on one thread per rank: a prefix loaded from files gives the logprobs of plain
# vLLM but for summation order (seen: at most 5e-7); bf16 rounding would be far larger.
LOGPROB_TOLERANCE = 1e-4
LOADED_TOKENS = "vllm:lmcache_fs_loaded_tokens_total"
LOADED_BYTES = "vllm:lmcache_fs_loaded_bytes_total"
LOAD_ERRORS = "vllm:lmcache_fs_load_errors_total"
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"  # vLLM's own count of connector hits
CLI = Path(sys.executable).with_name("lmcache-fs")
NOTES_FILE = "tp2-engines.json"  # what the tests measured (the notes fixture, conftest.py)

_rng = random.Random(28)


def _tokens(n: int) -> list[int]:
    return [_rng.randrange(3, 250) for _ in range(n)]


PROMPTS = {name: _tokens(1200) for name in  # 4 whole chunks each (a hit of 1,024 tokens)
           ("a stores", "b stores", "rank 1 damaged", "rank 0 missing", "c stores")}
PROMPTS["killed"] = _tokens(4000)  # 15 chunks, 8 steps of A's chunked prefill
# 2 chunks of what B stored, then 1,400 new tokens: A loads 512, prefills 1,488 in 3 steps.
PROMPTS["b's prefix, then new"] = PROMPTS["b stores"][:600] + _tokens(1400)
FULL_HIT = 4 * CHUNK


@dataclass(frozen=True)
class Answer:
    tokens: list[int]
    logprobs: list[float]

    def largest_gap(self, other: "Answer") -> float:
        return max(abs(a - b) for a, b in zip(self.logprobs, other.logprobs))


def _complete(spec: EngineSpec, prompt: list[int]) -> Answer:
    """One greedy completion with each sampled token's logprob."""
    response = requests.post(f"{spec.url}/v1/completions", timeout=600, json={
        "model": "tiny-llama", "prompt": prompt, "max_tokens": ANSWER_TOKENS,
        "temperature": 0.0, "ignore_eos": True, "logprobs": 0, "return_token_ids": True})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return Answer(choice["token_ids"], choice["logprobs"]["token_logprobs"])


def _counters(spec: EngineSpec) -> dict[str, float]:
    text = requests.get(f"{spec.url}/metrics", timeout=30).text
    return {name: metric_sum(text, name)
            for name in (LOADED_TOKENS, LOADED_BYTES, LOAD_ERRORS, EXTERNAL_HITS)}


def _moved(spec: EngineSpec, before: dict[str, float],
           until: Callable[[dict[str, float]], bool] = lambda _: True,
           timeout_s: float = 60) -> dict[str, float]:
    """How far the counters moved since ``before``, once ``until(moved)`` holds (stats of
    the workers reach the API server with the engine's steps)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = _counters(spec)
        moved = {name: now[name] - before[name] for name in now}
        if until(moved) or time.monotonic() > deadline:
            return moved
        time.sleep(0.25)


def _keys(prompt: list[int]) -> list[str]:
    from lmcache_fs.connector.prompt_keys import chunk_keys

    return chunk_keys(prompt, CHUNK, BLOCK)


def _files(storage: Path) -> dict[tuple[int, int], dict[str, Path]]:
    """Chunk files by the (tp_size, tp_rank) of their namespace, then by key."""
    found: dict[tuple[int, int], dict[str, Path]] = {}
    for ns in namespace_dirs(storage):
        manifest = read_manifest(ns) or {}
        rank = (int(manifest["tp_size"]), int(manifest["tp_rank"]))
        found.setdefault(rank, {}).update((c.key, Path(c.path)) for c in scan_chunks(ns))
    return found


def _wait_for_every_rank(storage: Path, keys: list[str], ranks=RANKS,
                         timeout_s: float = 60) -> dict[tuple[int, int], dict[str, Path]]:
    """The files once each of ``ranks`` holds every key (stores publish in the background)."""
    deadline = time.monotonic() + timeout_s
    while True:
        files = _files(storage)
        missing = [(rank, k[:8]) for rank in ranks for k in keys if k not in files.get(rank, {})]
        if not missing:
            return files
        if time.monotonic() > deadline:
            raise AssertionError(f"not stored after {timeout_s} s: (rank, key) {missing}")
        time.sleep(0.1)


def _whole_prefix(files: dict[tuple[int, int], dict[str, Path]], keys: list[str]) -> int:
    """Leading chunks of ``keys`` whose files every TP=2 rank holds: what a reader can load."""
    whole = 0
    while whole < len(keys) and all(keys[whole] in files.get(rank, {}) for rank in RANKS):
        whole += 1
    return whole


def _data_bytes(path: Path) -> int:
    header = read_header(path)
    return header.dtype.itemsize * int(torch.Size(header.shape).numel())


def _read_whole(path: Path, key: str) -> None:
    """Read and check a chunk file as a loader would (raises ChunkFileError)."""
    header = read_header(path)
    read_chunk_file(path, torch.empty(header.shape, dtype=header.dtype), {"key": key})


def _cli(storage: Path, *args: str) -> tuple[int, dict]:
    done = subprocess.run([str(CLI), *args, "--storage-path", str(storage), "--json"],
                          capture_output=True, text=True, timeout=300)
    return done.returncode, json.loads(done.stdout)


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tp2-kv")


@pytest.fixture(scope="module")
def reference(synthetic_model, artifacts_dir, notes) -> dict[str, Answer]:
    """Plain TP=2 vLLM's answer to every prompt (its engine stopped before the others start)."""
    start = time.monotonic()
    with served(synthetic_model, "plain", artifacts_dir / "tp2-plain.log",
                tensor_parallel_size=TP) as plain:
        notes["plain start s"] = round(time.monotonic() - start, 1)
        return {name: _complete(plain, prompt) for name, prompt in PROMPTS.items()}


@pytest.fixture(scope="module")
def engines(reference, synthetic_model, storage, artifacts_dir, notes):
    """A and B, TP=2 with lmcache-fs on ``storage``; the group lets a test kill A."""
    group = ProcessGroup()
    try:
        start = time.monotonic()
        a = start_served(group, synthetic_model, "a", artifacts_dir / "tp2-a.log", storage,
                         tensor_parallel_size=TP, settings={"layerwise_load": False},
                         extra_args=["--max-num-batched-tokens", "512"])
        b = start_served(group, synthetic_model, "b", artifacts_dir / "tp2-b.log", storage,
                         tensor_parallel_size=TP)
        wait_until_healthy([a, b], group, timeout_s=600, say=lambda _: None)
        notes["a and b start s (together)"] = round(time.monotonic() - start, 1)
        yield {"a": a, "b": b, "group": group, "logs": artifacts_dir}
    finally:
        group.stop_all()


def test_b_already_running_loads_the_chunks_a_stored_and_answers_like_plain_tp2(
        engines, storage, reference, notes):
    a, b = engines["a"], engines["b"]
    prompt, keys = PROMPTS["a stores"], _keys(PROMPTS["a stores"])
    before = _counters(b)
    stored = _complete(a, prompt)  # in three steps of 512 tokens (chunked prefill)
    files = _wait_for_every_rank(storage, keys)
    assert sorted(files) == list(RANKS)  # one namespace per rank
    assert all(sorted(files[rank]) == sorted(keys) for rank in RANKS)  # a file per chunk and rank

    loaded = _complete(b, prompt)
    plain = reference["a stores"]
    assert stored.tokens == loaded.tokens == plain.tokens
    assert loaded.largest_gap(plain) < LOGPROB_TOLERANCE
    moved = _moved(b, before, lambda m: m[LOADED_TOKENS] >= FULL_HIT)
    # The hit is counted once, not once per rank; the bytes are each rank's own file.
    assert moved[LOADED_TOKENS] == moved[EXTERNAL_HITS] == FULL_HIT
    assert moved[LOADED_BYTES] == sum(_data_bytes(files[rank][k]) for rank in RANKS for k in keys)
    notes["largest logprob gap, b loading a's chunks"] = loaded.largest_gap(plain)


def test_a_loads_whole_chunks_b_stored_then_prefills_the_rest_in_512_token_steps(
        engines, storage, reference):
    a, b = engines["a"], engines["b"]
    _complete(b, PROMPTS["b stores"])
    _wait_for_every_rank(storage, _keys(PROMPTS["b stores"]))
    before = _counters(a)
    got = _complete(a, PROMPTS["b's prefix, then new"])
    plain = reference["b's prefix, then new"]
    assert got.tokens == plain.tokens and got.largest_gap(plain) < LOGPROB_TOLERANCE
    moved = _moved(a, before, lambda m: m[LOADED_TOKENS] >= 2 * CHUNK)
    assert moved[LOADED_TOKENS] == 2 * CHUNK  # the two whole chunks the prompts share
    logs = engines["logs"]
    for log, reads in (("tp2-a.log", "loads whole chunks"), ("tp2-b.log", "loads layer by layer")):
        assert (logs / log).read_text().count(reads) == TP, log  # each rank's worker


def test_a_damaged_file_on_one_rank_is_a_miss_on_every_rank_and_the_answer_stays(
        engines, storage, reference):
    a, b = engines["a"], engines["b"]
    prompt, keys = PROMPTS["rank 1 damaged"], _keys(PROMPTS["rank 1 damaged"])
    _complete(a, prompt)
    damaged = _wait_for_every_rank(storage, keys)[(TP, 1)][keys[1]]
    flip_byte(damaged, 4096 + 1000)  # inside the data: the checksum fails
    before = _counters(b)
    got = _complete(b, prompt)
    plain = reference["rank 1 damaged"]
    assert got.tokens == plain.tokens and got.largest_gap(plain) < LOGPROB_TOLERANCE
    moved = _moved(b, before, lambda m: m[LOAD_ERRORS] >= 1 and m[LOADED_TOKENS] >= CHUNK)
    # Rank 0 read all four of its files, but rank 1 failed on chunk 1: vLLM recomputes
    # from there on both ranks, and rank 0 counts chunk 0 alone.
    assert moved[LOADED_TOKENS] == CHUNK and moved[LOAD_ERRORS] == 1
    warnings = [line for line in (engines["logs"] / "tp2-b.log").read_text().splitlines()
                if f"chunk {keys[1][:16]} unusable (checksum mismatch" in line]
    assert len(warnings) == 1 and "Worker_TP1" in warnings[0]
    # B quarantined rank 1's file and stored a good one (rank 0's was never touched).
    _wait_for_every_rank(storage, keys)
    _read_whole(damaged, keys[1])


def test_a_missing_file_on_one_rank_ends_the_hit_there_on_every_rank(engines, storage, reference):
    a, b = engines["a"], engines["b"]
    prompt, keys = PROMPTS["rank 0 missing"], _keys(PROMPTS["rank 0 missing"])
    _complete(a, prompt)
    _wait_for_every_rank(storage, keys)[(TP, 0)][keys[1]].unlink()  # evicted by another node
    before = _counters(b)
    got = _complete(b, prompt)
    plain = reference["rank 0 missing"]
    assert got.tokens == plain.tokens and got.largest_gap(plain) < LOGPROB_TOLERANCE
    moved = _moved(b, before, lambda m: m[LOADED_TOKENS] >= CHUNK)
    assert moved[LOADED_TOKENS] == CHUNK  # chunk 0 only, though rank 1 holds all four
    _wait_for_every_rank(storage, keys)  # B stored rank 0's file again


def test_a_writer_killed_mid_store_leaves_no_partial_file_and_b_answers_like_plain(
        engines, storage, reference, notes):
    b, group = engines["b"], engines["group"]
    prompt, keys = PROMPTS["killed"], _keys(PROMPTS["killed"])

    def ask_a() -> None:
        try:
            _complete(engines["a"], prompt)
        except requests.ConnectionError:
            pass  # killed under the request

    asking = threading.Thread(target=ask_a, daemon=True)
    asking.start()
    deadline = time.monotonic() + 120
    while not any(k in per_rank for per_rank in _files(storage).values() for k in keys):
        assert time.monotonic() < deadline, "A stored nothing of the prompt"
        time.sleep(0.001)
    group.kill("a")  # the API server, its engine core and both workers, at once
    asking.join(timeout=60)
    files = _files(storage)
    stored = [(rank, k) for rank in RANKS for k in keys if k in files.get(rank, {})]
    assert 0 < len(stored) < TP * len(keys)  # killed mid-store
    for rank, key in stored:  # every file visible under a chunk's name is whole
        _read_whole(files[rank][key], key)
    whole = _whole_prefix(files, keys)
    before = _counters(b)
    got = _complete(b, prompt)
    plain = reference["killed"]
    assert got.tokens == plain.tokens and got.largest_gap(plain) < LOGPROB_TOLERANCE
    # A chunk only some ranks stored before the kill is no hit for any of B's ranks.
    assert _moved(b, before, lambda m: m[LOADED_TOKENS] >= whole * CHUNK)[LOADED_TOKENS] == \
        whole * CHUNK
    notes["killed mid-store"] = {"files of the prompt": len(stored), "of": TP * len(keys),
                                 "chunks every rank held": whole}


def test_a_tp1_and_a_tp2_engine_on_one_directory_never_load_each_others_chunks(
        engines, storage, synthetic_model, notes):
    b = engines["b"]
    start = time.monotonic()
    with served(synthetic_model, "c", engines["logs"] / "tp1-c.log", storage) as c:
        notes["c start s (beside b)"] = round(time.monotonic() - start, 1)
        before = _counters(c)
        _complete(c, PROMPTS["a stores"])  # every chunk of it is on disk, from TP=2 ranks
        assert _moved(c, before)[EXTERNAL_HITS] == 0
        _complete(c, PROMPTS["c stores"])
        files = _wait_for_every_rank(storage, _keys(PROMPTS["c stores"]), ranks=[(1, 0)])
    # C kept its own copy of the prompt B had loaded: same keys, another namespace.
    assert set(_keys(PROMPTS["a stores"])) <= set(files[(1, 0)])
    before = _counters(b)
    _complete(b, PROMPTS["c stores"])
    assert _moved(b, before)[EXTERNAL_HITS] == 0
    names = {ns.name: read_manifest(ns) for ns in namespace_dirs(storage)}
    assert sorted((m["tp_size"], m["tp_rank"]) for m in names.values()) == [(1, 0), *RANKS]


def test_ls_stats_verify_and_eviction_on_a_tp2_directory_treat_a_chunk_of_all_ranks_as_one(
        engines, storage, reference):
    b = engines["b"]
    every_prompt = [_keys(PROMPTS[name]) for name in
                    ("a stores", "b stores", "rank 1 damaged", "rank 0 missing", "killed")]
    files = _wait_for_every_rank(storage, [k for keys in every_prompt for k in keys])
    code, ls = _cli(storage, "ls")
    chunks = {row["name"]: row["chunks"] for row in ls["namespaces"]}
    rank_of = {ns.name: (read_manifest(ns)["tp_size"], read_manifest(ns)["tp_rank"])
               for ns in namespace_dirs(storage)}
    by_rank = {rank_of[name]: count for name, count in chunks.items()}
    assert code == 0 and by_rank[RANKS[0]] == by_rank[RANKS[1]] == len(files[RANKS[0]])
    code, verify = _cli(storage, "verify")
    assert code == 0 and verify["checked"] == sum(chunks.values()) and verify["bad"] == []
    code, stats = _cli(storage, "stats")
    assert code == 0 and stats["chunks"] == sum(chunks.values())
    assert stats["quarantined"] == 1  # rank 1's damaged file

    budget = stats["bytes"] * 0.6  # evicts down to 85% of that: about half of the chunks
    code, report = _cli(storage, "gc", "--max-disk-size-gb", str(budget / 1e9))
    assert code == 0 and report["evicted_chunks"] > 0
    after = _files(storage)
    tp2_keys = set(files[RANKS[0]])
    kept = tp2_keys & set(after[RANKS[0]])
    assert 0 < len(kept) < len(tp2_keys)
    assert kept == tp2_keys & set(after[RANKS[1]])  # all ranks or none
    # B loads what is left of a prompt it answered (its own prefix cache emptied first).
    assert requests.post(f"{b.url}/reset_prefix_cache", timeout=60).json()["success"]
    keys = _keys(PROMPTS["a stores"])
    whole = _whole_prefix(after, keys)
    before = _counters(b)
    got = _complete(b, PROMPTS["a stores"])
    assert got.tokens == reference["a stores"].tokens
    assert _moved(b, before, lambda m: m[LOADED_TOKENS] >= whole * CHUNK)[LOADED_TOKENS] == \
        whole * CHUNK
