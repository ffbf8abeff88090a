"""Hybrid KV cache groups without an engine: window arithmetic against vLLM's own managers,
hits every group can serve, loads that skip vLLM's null blocks, saves of the window's blocks."""

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm_objects import blocks, new_request, request, step  # noqa: E402

from lmcache_fs.connector.groups import describe_groups, geometry_of  # noqa: E402
from lmcache_fs.connector.scheduler import GroupIndexes, SchedulerSide  # noqa: E402
from lmcache_fs.storage.index import ChunkIndex  # noqa: E402
from lmcache_fs.storage.layout import ChunkLayout, Namespace  # noqa: E402
from vllm.v1.core.single_type_kv_cache_manager import (  # noqa: E402
    ChunkedLocalAttentionManager,
    SlidingWindowManager,
)
from vllm.v1.kv_cache_interface import (  # noqa: E402
    ChunkedLocalAttentionSpec,
    FullAttentionSpec,
    SlidingWindowSpec,
)

BLOCK, CHUNK = 16, 64  # 4 blocks per chunk


def _spec(kind, **extra):
    return kind(block_size=BLOCK, num_kv_heads=2, head_size=8, dtype=torch.bfloat16, **extra)


def _vllm_skipped(spec, tokens: int) -> int:
    """vLLM's own count of tokens before the window (its managers' method, unbound)."""
    if isinstance(spec, SlidingWindowSpec):
        state = SimpleNamespace(sliding_window=spec.sliding_window, extra_retained_tokens=0)
        return SlidingWindowManager.get_num_skipped_tokens(state, tokens)
    state = SimpleNamespace(attention_chunk_size=spec.attention_chunk_size)
    return ChunkedLocalAttentionManager.get_num_skipped_tokens(state, tokens)


@pytest.mark.parametrize("spec", [_spec(SlidingWindowSpec, sliding_window=w)
                                  for w in (1, 15, 16, 17, 40, 64, 65, 200)]
                         + [_spec(ChunkedLocalAttentionSpec, attention_chunk_size=a)
                            for a in (16, 48, 64, 128)])
def test_files_hold_every_block_vllm_keeps_at_any_chunk_aligned_hit(spec):
    geo = geometry_of(spec, CHUNK)
    for hit in range(CHUNK, 12 * CHUNK, CHUNK):
        first_real = _vllm_skipped(spec, hit) // BLOCK  # vLLM's null blocks come before
        assert geo.needed_blocks(hit, 0) == range(first_real, hit // BLOCK)
        for block in geo.needed_blocks(hit, 0):
            assert block >= geo.first_held_block(block // (CHUNK // BLOCK))


def test_sliding_window_files_hold_only_the_window_at_the_chunk_end():
    assert geometry_of(_spec(SlidingWindowSpec, sliding_window=16), CHUNK).held_blocks == 1
    assert geometry_of(_spec(SlidingWindowSpec, sliding_window=18), CHUNK).held_blocks == 2
    assert geometry_of(_spec(SlidingWindowSpec, sliding_window=64), CHUNK).held_blocks == 4
    assert geometry_of(_spec(FullAttentionSpec), CHUNK).held_blocks == 4


def test_group_specs_differing_in_any_field_describe_differently():
    base = [_spec(SlidingWindowSpec, sliding_window=32), _spec(FullAttentionSpec)]
    variants = [[_spec(SlidingWindowSpec, sliding_window=48), _spec(FullAttentionSpec)],
                [_spec(FullAttentionSpec), _spec(SlidingWindowSpec, sliding_window=32)],
                [_spec(ChunkedLocalAttentionSpec, attention_chunk_size=32),
                 _spec(FullAttentionSpec)]]
    described = {describe_groups(specs, [2, 1], CHUNK) for specs in [base, *variants]}
    assert len(described) == 4
    assert describe_groups(base, [2, 2], CHUNK) != describe_groups(base, [2, 1], CHUNK)
    assert json.loads(describe_groups(base, [2, 1], CHUNK))[0]["window"] == 32


# -- the scheduler with a sliding group (window 20: files hold 2 of 4 blocks) and a full one --

def _request(req_id, num_tokens):
    return request(req_id, num_tokens, BLOCK)


def _side(tmp_path):
    sliding = ChunkIndex(ChunkLayout(tmp_path, Namespace({"model": "m", "kv_group": 0})), negative_ttl_s=0)
    full = ChunkIndex(ChunkLayout(tmp_path, Namespace({"model": "m", "kv_group": 1})), negative_ttl_s=0)
    groups = [GroupIndexes(geometry_of(_spec(SlidingWindowSpec, sliding_window=20), CHUNK), [sliding]),
              GroupIndexes(geometry_of(_spec(FullAttentionSpec), CHUNK), [full])]
    return SchedulerSide(groups, CHUNK, BLOCK, BLOCK, True, True), sliding, full


def test_the_hit_is_what_every_group_can_serve(tmp_path):
    side, sliding, full = _side(tmp_path)
    req = _request("r", 4 * CHUNK + 5)
    keys = side.chunk_keys(req, req.num_tokens)
    for key in keys:
        full.add(key)
    assert side.get_num_new_matched_tokens(req, 0) == 0  # no window file at all
    sliding.add(keys[3])
    assert side.get_num_new_matched_tokens(req, 0) == 4 * CHUNK  # only the last window counts
    sliding.discard(keys[3])
    sliding.add(keys[1])
    assert side.get_num_new_matched_tokens(req, 0) == 2 * CHUNK  # the longest servable hit


def test_loads_skip_null_blocks_and_saves_take_the_windows_blocks(tmp_path):
    side, sliding, full = _side(tmp_path)
    req = _request("r", 3 * CHUNK + 5)
    keys = side.chunk_keys(req, req.num_tokens)
    for key in keys[:2]:
        full.add(key)
        sliding.add(key)
    hit = side.get_num_new_matched_tokens(req, 0)
    assert hit == 2 * CHUNK
    # window 20 at token 128: vLLM skips 109 tokens, 6 whole blocks (nulls), keeps 6 and 7.
    sliding_ids = [None] * 6 + [106, 107, 108, 109, 110, 111, 112]
    full_ids = list(range(200, 213))
    side.update_state_after_alloc(req, blocks(sliding_ids, full_ids), hit)
    new = new_request(req, ([b or 0 for b in sliding_ids], full_ids), hit)
    meta = side.build_connector_meta(step([new], scheduled={"r": CHUNK + 5}))
    loads = [(op.group, op.key, op.first_block, op.block_ids) for op in meta.loads]
    assert loads == [(0, keys[1], 0, (106, 107)),  # the file's two blocks: chunk 1's last two
                     (1, keys[0], 0, (200, 201, 202, 203)), (1, keys[1], 0, (204, 205, 206, 207))]
    saves = [(op.group, op.key, op.block_ids) for op in meta.saves]
    assert saves == [(0, keys[2], (110, 111)), (1, keys[2], (208, 209, 210, 211))]


# -- the worker side of two groups: each its own files, failures reported per request --

def _grouped(tmp_path, caches):
    from lmcache_fs.config import load_config
    from lmcache_fs.connector.group_worker import GroupFiles, WorkerContext
    from lmcache_fs.connector.worker import WorkerSide
    from lmcache_fs.storage.store import ChunkStore

    config = load_config({"storage_path": str(tmp_path), "save_queue_size": 8})
    groups = [GroupFiles(ChunkStore(ChunkLayout(tmp_path, Namespace({"model": "m", "kv_group": g}))),
                         [f"layer{g}"], held, counts_tokens=g == 1)
              for g, held in enumerate((2, 4))]  # a sliding group holding 2 blocks, a full one
    grouped = WorkerSide(WorkerContext(config, BLOCK, can_save=True), groups)
    assert grouped.async_loads  # several groups: vLLM takes their failures per request only
    grouped.register_kv_caches({f"layer{g}": kv for g, kv in enumerate(caches)})
    return grouped


def _kv(fill=None):
    if fill is not None:
        return torch.full((20, 2, BLOCK, 8), fill, dtype=torch.bfloat16)
    return torch.randn(20, 2, BLOCK, 8).to(torch.bfloat16)


def test_a_worker_of_two_groups_stores_each_and_reports_a_failed_group_per_request(tmp_path):
    from lmcache_fs.connector.metadata import LMCacheFSMetadata, LoadOp, SaveOp

    src = [_kv(), _kv()]
    saver = _grouped(tmp_path, src)
    key = "ab" * 32
    saver.save(LMCacheFSMetadata(saves=[SaveOp("w", key, "", 0, (2, 3), 0),
                                        SaveOp("w", key, "", 0, (4, 5, 6, 7), 1)]))
    saver.close()

    dst = [_kv(0.0), _kv(0.0)]
    loader = _grouped(tmp_path, dst)
    loads = [LoadOp("r", key, 0, (12, 13), 0), LoadOp("r", key, 0, (14, 15, 16, 17), 1)]
    loader.load(LMCacheFSMetadata(loads=loads, async_loads=["r"]))
    loader.save(LMCacheFSMetadata())
    results = loader.transfer_results()
    assert (results.finished_recving, results.failed_recving) == ({"r"}, set())
    assert torch.equal(dst[0][12:14], src[0][2:4]) and torch.equal(dst[1][14:18], src[1][4:8])

    # the sliding group's file is gone (evicted): the request fails whole, in the same step
    ChunkLayout(tmp_path, Namespace({"model": "m", "kv_group": 0})).chunk_path(key).unlink()
    loader.load(LMCacheFSMetadata(loads=loads, async_loads=["r"]))
    results = loader.transfer_results()
    assert (results.finished_recving, results.failed_recving) == ({"r"}, {"r"})
    assert loader.take_failed_blocks() == set()  # (reported per request instead)
    loader.close()
