"""The connector's ``vllm:lmcache_fs_*`` series: mapped causes, and a real engine's ``/metrics``.

One ``vllm serve`` engine with lmcache-fs (module-scoped): a prompt is stored,
loaded back from its chunk files (its engine's prefix cache reset in between),
then loaded again after a byte of a stored chunk was flipped, then another prompt
is asked while the directory is at its budget. After each step the API server's
``/metrics`` must show the counters that step moves.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest
import requests
from cachedir import flip_byte, wait_for_count
from engines import served
from launcher import EngineSpec
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("vllm")

from lmcache_fs.connector.stats import LMCacheFSStats, load_error_reason  # noqa: E402
from lmcache_fs.ops.inventory import namespace_dirs, scan_chunks  # noqa: E402
from lmcache_fs.storage.codec import ChunkFileError  # noqa: E402
from lmcache_fs.storage.layout import usage_path  # noqa: E402
from lmcache_fs.storage.usage import read_usage, write_usage  # noqa: E402

CHUNK = 256  # lmcache-fs's default chunk_size
PROMPT = [random.Random(16).randrange(3, 250) for _ in range(2 * CHUNK + 20)]  # 2 full chunks
OTHER_PROMPT = [random.Random(17).randrange(3, 250) for _ in range(2 * CHUNK + 20)]
SKIPPED, STORED = "vllm:lmcache_fs_store_skipped_total", "vllm:lmcache_fs_stored_chunks_total"


@pytest.mark.parametrize(("message", "reason"), [
    ("missing", "missing"),
    ("checksum mismatch: the data is corrupt", "checksum"),
    ("device checksum mismatch: the data is corrupt", "checksum"),
    ("MAC mismatch: written with another key, or altered", "checksum"),
    ("holds torch.float32 [2, 4], expected torch.bfloat16 [2, 4]", "shape"),
    ("metadata namespace='a', expected 'b'", "shape"),
    ("read failed: Input/output error", "io"),
    ("short read: 10 of 4096 data bytes", "io"),
    ("truncated inside the header", "io"),
    ("cannot open: Stale file handle", "io"),
    ("foreign safetensors file (no lmcache-fs format tag)", "other"),
])
def test_each_chunk_file_error_is_counted_under_its_cause(message, reason):
    assert load_error_reason(ChunkFileError(message)) == reason


def test_stats_from_two_workers_add_up_reasons_and_samples():
    a, b = LMCacheFSStats(), LMCacheFSStats()
    a.record_load_error(ChunkFileError("missing"))
    a.record_load(100, 1, 256, 0.5)
    b.record_load_error(ChunkFileError("checksum mismatch"))
    b.record_saves(2, 200, {"queue_full": 1, "disk_guard": 0}, 0)
    data = a.aggregate(b).data
    assert data["load_errors_by_reason"] == {"missing": 1, "checksum": 1}
    assert data["skipped_by_reason"] == {"queue_full": 1} and data["stored_bytes"] == 200
    assert data["load_step_seconds"] == [0.5] and data["load_errors"] == 2


@pytest.mark.parametrize("counts_tokens", [True, False], ids=["tp-rank-0", "other-rank"])
def test_bytes_count_on_every_rank_tokens_on_one(tmp_path, counts_tokens):
    # vLLM sums the workers' stats: with tensor parallelism each rank reads its own files
    # (bytes add up) but loads the same tokens (counted by rank 0 only, else TP times).
    import torch

    from test_worker_side import one_group_worker

    from lmcache_fs.connector.metadata import LMCacheFSMetadata, LoadOp, SaveOp
    from lmcache_fs.storage.layout import ChunkLayout, Namespace
    from lmcache_fs.storage.store import ChunkStore

    names, key = ["model.layers.0.self_attn.attn"], "ab" * 32
    caches = [torch.randn(8, 1, 16, 16)]
    store = ChunkStore(ChunkLayout(tmp_path, Namespace({"model": "m"})))
    worker = one_group_worker(tmp_path, store, names, 2, 16, counts_tokens=counts_tokens)
    worker.register_kv_caches(dict(zip(names, caches)))
    worker.save(LMCacheFSMetadata(saves=[SaveOp("w", key, "", 0, (0, 1))]))
    worker.groups[0].writer.close()  # published
    worker.load(LMCacheFSMetadata(loads=[LoadOp("r", key, 0, (4, 5))]))
    data = worker.take_stats().data
    assert data["loaded_bytes"] == 2 * 16 * 16 * 4 and data["loaded_chunks"] == 1
    assert data["loaded_tokens"] == (32 if counts_tokens else 0)
    worker.close()


def _scrape(spec: EngineSpec) -> str:
    return requests.get(f"{spec.url}/metrics", timeout=30).text


def _metrics(spec: EngineSpec) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the engine's /metrics, summed over its engine labels."""
    text = _scrape(spec)
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = frozenset((k, v) for k, v in s.labels.items() if k not in ("engine", "model_name"))
            out[(s.name, labels)] = out.get((s.name, labels), 0.0) + s.value
    return out


def _value(metrics, name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def _chunk_files(storage: Path) -> list[Path]:
    return [Path(c.path) for ns in namespace_dirs(storage) for c in scan_chunks(ns)]


@pytest.fixture(scope="module")
def engine(synthetic_model, tmp_path_factory, artifacts_dir):
    storage = tmp_path_factory.mktemp("metrics-kv")
    # A budget far above what the test stores, and one eviction pass (at start-up): the
    # budget test below then plants the pass's record itself.
    settings = tmp_path_factory.mktemp("metrics-settings") / "lmcache-fs.yaml"
    settings.write_text("max_disk_size_gb: 1\neviction_interval_s: 3600\n")
    log = artifacts_dir / "metrics-engine.log"
    with served(synthetic_model, "metrics", log, storage, env={
            "VLLM_LOG_STATS_INTERVAL": "1",  # vLLM's periodic stats lines, every second
            "LMCACHE_CONFIG_FILE": str(settings)}) as spec:
        yield spec, storage, synthetic_model.name, log


def _ask(engine, prompt: list[int] = PROMPT) -> None:
    """One request, then the engine's own prefix cache is emptied: the next one can only
    hit chunk files."""
    spec, _, model, _ = engine
    response = requests.post(f"{spec.url}/v1/completions", timeout=300, json={
        "model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0.0})
    assert response.status_code == 200, response.text
    assert requests.post(f"{spec.url}/reset_prefix_cache", timeout=60).json()["success"]


def _until(spec: EngineSpec, moved, timeout_s: float = 60):
    """Scrape until ``moved(metrics)`` holds (stores publish in the background)."""
    deadline = time.monotonic() + timeout_s
    while not moved(metrics := _metrics(spec)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return metrics


@pytest.mark.engine
def test_a_hit_a_store_and_a_corrupt_chunk_move_the_engines_series(engine, artifacts_dir):
    spec, storage, _, _ = engine
    before = _metrics(spec)
    # Every series exists from start-up, at zero.
    for name in ("vllm:lmcache_fs_loaded_bytes_total", "vllm:lmcache_fs_store_failed_total"):
        assert (name, frozenset()) in before
    assert ("vllm:lmcache_fs_load_errors_total", frozenset({("reason", "checksum")})) in before

    _ask(engine)  # stores both chunks
    files = wait_for_count(lambda: _chunk_files(storage), 2)
    assert len(files) == 2

    _ask(engine)  # both chunks from the files
    after_hit = _until(spec, lambda m: _value(m, "vllm:lmcache_fs_stored_chunks_total") >= 2
                       and _value(m, "vllm:lmcache_fs_loaded_tokens_total") >= 2 * CHUNK)
    assert _value(after_hit, "vllm:lmcache_fs_loaded_tokens_total") == 2 * CHUNK
    loaded = _value(after_hit, "vllm:lmcache_fs_loaded_bytes_total")
    stored = _value(after_hit, "vllm:lmcache_fs_stored_bytes_total")
    assert loaded > 0 and loaded == stored  # the same two chunks went out and came back
    assert _value(after_hit, "vllm:lmcache_fs_stored_chunks_total") == 2
    assert _value(after_hit, "vllm:lmcache_fs_load_seconds_count") >= 1
    assert _value(after_hit, "vllm:lmcache_fs_load_seconds_sum") > 0
    assert _value(after_hit, "vllm:prompt_tokens_cached_by_source_total", source="disk") >= 2 * CHUNK

    for path in files:
        flip_byte(path, 4096 + 1000)  # inside the data (it starts at byte 4096)
    _ask(engine)  # the first chunk fails its checksum: recomputed
    after_bad = _until(spec, lambda m: _value(m, "vllm:lmcache_fs_load_errors_total",
                                              reason="checksum") >= 1)
    assert _value(after_bad, "vllm:lmcache_fs_load_errors_total", reason="checksum") == 1
    assert _value(after_bad, "vllm:lmcache_fs_loaded_tokens_total") == 2 * CHUNK  # nothing more
    for reason in ("missing", "shape", "io", "other"):
        assert _value(after_bad, "vllm:lmcache_fs_load_errors_total", reason=reason) == 0
    # For docs/operations-metrics.md: our series and vLLM's per-source hits, as scraped.
    (artifacts_dir / "metrics-engine-scrape.txt").write_text("".join(
        line + "\n" for line in _scrape(spec).splitlines()
        if "lmcache_fs" in line or "cached_by_source" in line))


@pytest.mark.engine
def test_the_engine_logs_through_vllms_format_and_sums_hits_up_periodically(engine):
    spec, _, _, log = engine  # runs after the test above: the engine has loaded and stored

    def summaries() -> list[str]:
        return re.findall(r"INFO .* KV Transfer metrics: (hit_tokens=\d+.*)", log.read_text())

    def hit_tokens() -> int:
        return sum(int(re.match(r"hit_tokens=(\d+)", s).group(1)) for s in summaries())

    # vLLM's periodic INFO line (every VLLM_LOG_STATS_INTERVAL while the engine is busy)
    # carries lmcache-fs's sums for its interval: over the lines, the 512 tokens loaded.
    deadline = time.monotonic() + 30
    while hit_tokens() < 2 * CHUNK and time.monotonic() < deadline:
        time.sleep(0.5)
    assert hit_tokens() == 2 * CHUNK, summaries()
    assert all(re.fullmatch(r"hit_tokens=\d+, loaded=[\d.]+ [KMGT]?B, load_GBps=[\d.]+, "
                            r"load_errors=\d+, stored_chunks=\d+, skipped_stores=\d+, "
                            r"failed_stores=\d+", s.strip()) for s in summaries()), summaries()
    text = log.read_text()
    # Our lines in vLLM's format, on the engine's stdout; the per-request hit line is DEBUG.
    assert re.search(r"^\(EngineCore pid=\d+\) INFO \S+ \S+ \[index\.py:\d+\] "
                     r"namespace ", text, re.MULTILINE)
    assert not re.search(r"request \S+: hit \d+/\d+ tokens", text)


@pytest.mark.engine
def test_a_directory_at_its_budget_skips_stores_and_counts_them(engine):
    """The last eviction pass measured the directory full (its record planted so here): the
    engine answers, stores nothing new, and counts each skipped store under "budget"."""
    spec, storage, _, log = engine
    measured, budget = read_usage(storage)  # its own evictor measured it at start-up
    assert budget == 10**9 and measured < 64 << 10  # no chunk then: at most the records
    # The test above stores its prompt again after the flipped files: let those stores land
    # (vLLM reports a store's count at the engine's next step, so only the files tell).
    files = wait_for_count(lambda: _chunk_files(storage), 2)
    before = _metrics(spec)
    write_usage(storage, 10**12)
    time.sleep(1.5)  # a guard looks at the record once a second at most
    try:
        _ask(engine, OTHER_PROMPT)  # two new chunks to store
        after = _until(spec, lambda m: _value(m, SKIPPED, reason="budget")
                       >= _value(before, SKIPPED, reason="budget") + 2)
    finally:
        usage_path(storage).unlink()
    assert _value(after, SKIPPED, reason="budget") - _value(before, SKIPPED, reason="budget") == 2
    assert _value(after, STORED) <= 4  # the test above's: its prompt twice, nothing of this one
    assert _chunk_files(storage) == files
    assert "the cache directory is at its budget of 1.0 GB" in log.read_text()
