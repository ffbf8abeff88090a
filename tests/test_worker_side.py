"""The worker's data path without an engine: blocks saved by one worker load bit-exactly into another."""

import pytest
import torch

pytest.importorskip("vllm")

from lmcache_fs.config import load_config  # noqa: E402
from lmcache_fs.connector.group_worker import GroupFiles, WorkerContext  # noqa: E402
from lmcache_fs.connector.metadata import HitSummary, LMCacheFSMetadata, LoadOp, SaveOp  # noqa: E402
from lmcache_fs.connector.ranks import this_rank_only  # noqa: E402
from lmcache_fs.connector.worker import WorkerSide  # noqa: E402

from lmcache_fs.storage.layout import ChunkLayout, Namespace  # noqa: E402
from lmcache_fs.storage.store import ChunkStore  # noqa: E402
from lmcache_fs.storage.usage import BudgetGuard, write_usage  # noqa: E402

LAYERS, BLOCKS, HEADS, BLOCK, HEAD2, PER_CHUNK = 3, 40, 2, 16, 32, 4
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
KEYS = [f"{i:02x}" * 32 for i in range(3)]


@pytest.fixture(params=["auto", "false"], ids=["layerwise", "whole-chunks"])
def layerwise(request):
    return request.param


def one_group_worker(root, store, names, held_blocks, block_size, *, layerwise_load="auto",
                     guards=(), any_rank=this_rank_only, counts_tokens=True) -> WorkerSide:
    """The worker side of an engine of one KV cache group (a plain model), as the connector
    builds it, storing into ``store``."""
    config = load_config({"storage_path": str(root), "save_queue_size": 8,
                          "layerwise_load": layerwise_load})
    return WorkerSide(WorkerContext(config, block_size, True, guards, any_rank),
                      [GroupFiles(store, names, held_blocks, counts_tokens)])


def _worker(tmp_path, layers, layerwise="auto"):
    store = ChunkStore(ChunkLayout(tmp_path, Namespace({"model": "m"})))
    side = one_group_worker(tmp_path, store, NAMES, PER_CHUNK, BLOCK, layerwise_load=layerwise)
    side.register_kv_caches(dict(zip(NAMES, layers)))
    # auto: layer-wise on CPU
    assert (side.groups[0].layer_reader is not None) == (layerwise == "auto")
    return side


def _caches(fill=None):
    if fill is not None:
        return [torch.full((BLOCKS, HEADS, BLOCK, HEAD2), fill, dtype=torch.bfloat16) for _ in NAMES]
    return [torch.randn(BLOCKS, HEADS, BLOCK, HEAD2).to(torch.bfloat16) for _ in NAMES]


def test_saved_blocks_load_bit_exactly_into_other_block_ids(tmp_path, layerwise):
    src = _caches()
    saver = _worker(tmp_path, src)
    chunks = [(3, 4, 5, 6), (10, 11, 12, 13), (20, 21, 22, 23)]
    saver.save(LMCacheFSMetadata(saves=[SaveOp("w", k, "", i, ids) for i, (k, ids) in
                                        enumerate(zip(KEYS, chunks))]))
    saver.close()

    dst = _caches(fill=0.0)
    loader = _worker(tmp_path, dst, layerwise)
    # The first block of chunk 0 is already in the local prefix cache: load from block 1.
    loads = [LoadOp("r", KEYS[0], 1, (31, 32, 33)), LoadOp("r", KEYS[1], 0, (0, 1, 2, 3)),
             LoadOp("r", KEYS[2], 0, (36, 37, 38, 39))]
    loader.load(LMCacheFSMetadata(loads=loads, hits={"r": HitSummary(11 * BLOCK, 200, BLOCK)}))
    assert loader.take_failed_blocks() == set()
    pairs = [(4, 31), (5, 32), (6, 33), (10, 0), (11, 1), (12, 2), (13, 3),
             (20, 36), (21, 37), (22, 38), (23, 39)]
    for layer in range(LAYERS):
        for s, d in pairs:
            assert torch.equal(dst[layer][d], src[layer][s]), (layer, s, d)
    untouched = [b for b in range(BLOCKS) if b not in {d for _, d in pairs}]
    assert all(torch.count_nonzero(kv[untouched]) == 0 for kv in dst)


def test_a_missing_chunk_fails_its_blocks_and_every_later_one_of_the_request(tmp_path, layerwise):
    src = _caches()
    saver = _worker(tmp_path, src)
    saver.save(LMCacheFSMetadata(saves=[SaveOp("w", KEYS[0], "", 0, (0, 1, 2, 3)),
                                        SaveOp("w", KEYS[2], "", 2, (8, 9, 10, 11))]))
    saver.close()
    loader = _worker(tmp_path, _caches(fill=0.0), layerwise)
    loads = [LoadOp("r", KEYS[0], 0, (0, 1, 2, 3)), LoadOp("r", KEYS[1], 0, (4, 5, 6, 7)),
             LoadOp("r", KEYS[2], 0, (8, 9, 10, 11)), LoadOp("other", KEYS[2], 0, (20, 21, 22, 23))]
    loader.load(LMCacheFSMetadata(loads=loads))
    assert loader.take_failed_blocks() == {4, 5, 6, 7, 8, 9, 10, 11}
    assert torch.equal(loader.groups[0].layers[0][20], src[0][8])  # the other request still loads


def test_stats_count_only_the_chunks_that_loaded(tmp_path, layerwise):
    saver = _worker(tmp_path, _caches())
    saver.save(LMCacheFSMetadata(saves=[SaveOp("w", KEYS[0], "", 0, (0, 1, 2, 3))]))
    saver.close()
    loader = _worker(tmp_path, _caches(fill=0.0), layerwise)
    loader.load(LMCacheFSMetadata(loads=[LoadOp("r", KEYS[0], 0, (0, 1, 2, 3)),
                                         LoadOp("r", KEYS[1], 0, (4, 5, 6, 7)),
                                         LoadOp("r", KEYS[2], 0, (8, 9, 10, 11))]))
    stats = loader.take_stats().data
    assert stats["loaded_chunks"] == 1 and stats["load_errors"] == 1


def test_a_chunk_that_failed_on_another_rank_is_a_hit_on_no_rank(tmp_path, layerwise):
    # vLLM recomputes the blocks any rank failed to load, on every rank: this rank read
    # both chunks, but the counting rank may count only the first (else a damaged file on
    # rank 1 would count its whole prompt as loaded in /metrics).
    saver = _worker(tmp_path, _caches())
    saver.save(LMCacheFSMetadata(saves=[SaveOp("w", KEYS[0], "", 0, (0, 1, 2, 3)),
                                        SaveOp("w", KEYS[1], KEYS[0], 1, (4, 5, 6, 7))]))
    saver.close()
    asked = []

    def second_chunk_failed_elsewhere(failed: list[bool]) -> list[bool]:
        asked.append(list(failed))
        return [False, True]

    store = ChunkStore(ChunkLayout(tmp_path, Namespace({"model": "m"})))
    config = load_config({"storage_path": str(tmp_path), "layerwise_load": layerwise})
    loader = WorkerSide(WorkerContext(config, BLOCK, False, (), second_chunk_failed_elsewhere),
                        [GroupFiles(store, NAMES, PER_CHUNK)])
    loader.register_kv_caches(dict(zip(NAMES, _caches(fill=0.0))))
    loader.load(LMCacheFSMetadata(loads=[LoadOp("r", KEYS[0], 0, (0, 1, 2, 3)),
                                         LoadOp("r", KEYS[1], 0, (4, 5, 6, 7))]))
    stats = loader.take_stats().data
    assert asked == [[False, False]]  # both loaded here
    assert stats["loaded_tokens"] == PER_CHUNK * BLOCK and stats["loaded_chunks"] == 2
    assert loader.take_failed_blocks() == set()  # the failing rank reports its blocks
    loader.close()


def test_stores_past_the_budget_are_counted_by_reason_once(tmp_path):
    store = ChunkStore(ChunkLayout(tmp_path, Namespace({"model": "m"})))
    chunk_file = 4096 + LAYERS * PER_CHUNK * HEADS * BLOCK * HEAD2 * 2
    write_usage(tmp_path, 0)  # a pass measured an empty directory; room for two chunks
    side = one_group_worker(tmp_path, store, NAMES, PER_CHUNK, BLOCK,
                            guards=[BudgetGuard(tmp_path, max_bytes=2 * chunk_file)])
    side.register_kv_caches(dict(zip(NAMES, _caches())))
    side.save(LMCacheFSMetadata(saves=[SaveOp("w", k, "", i, tuple(range(4 * i, 4 * i + 4)))
                                       for i, k in enumerate(KEYS)]))
    side.groups[0].writer.flush()
    stats = side.take_stats().data
    assert stats["stored_chunks"] == 2 and stats["skipped_by_reason"] == {"budget": 1}
    assert side.take_stats() is None  # reported once
    side.close()


# -- no store may rest on a failed load --------------------------------------------------

def _step_with_a_failed_load(side, failed_load_steps=0):
    """Loads KEYS[1] (never stored: missing) for request "r"; another request saves a chunk."""
    meta = LMCacheFSMetadata(loads=[LoadOp("r", KEYS[1], 0, (0, 1, 2, 3))],
                             saves=[SaveOp("r", KEYS[2], KEYS[1], 1, (4, 5, 6, 7)),
                                    SaveOp("other", KEYS[0], "", 0, (8, 9, 10, 11))],
                             failed_load_steps=failed_load_steps)
    side.load(meta)
    side.save(meta)
    return side.take_failed_blocks()


def _stored(side):
    group = side.groups[0]
    group.writer.flush()
    return [k for k in KEYS if group.store.layout.chunk_path(k).exists()]


def test_after_a_failed_load_no_chunk_is_stored_until_the_scheduler_has_heard(tmp_path, layerwise):
    # The forward pass ran over blocks that never got their KV: chunk 1 of "r" rests on them,
    # and so may "other" (vLLM lets requests share blocks loaded in the same step).
    side = _worker(tmp_path, _caches(), layerwise)
    assert _step_with_a_failed_load(side) == {0, 1, 2, 3}
    assert _stored(side) == []
    # With async scheduling the next step was built before the failure was reported.
    late = LMCacheFSMetadata(saves=[SaveOp("other", KEYS[0], "", 0, (8, 9, 10, 11))])
    side.load(late)
    side.save(late)
    assert _stored(side) == []
    # A step built after the report: vLLM has reset the requests, saves are sound again;
    # the scheduler released none of the held ones here, so all three are dropped.
    after = LMCacheFSMetadata(saves=[SaveOp("other", KEYS[0], "", 0, (8, 9, 10, 11))],
                              failed_load_steps=1)
    side.load(after)
    side.save(after)
    assert _stored(side) == [KEYS[0]]
    assert side.take_stats().data["skipped_stores"] == 3
    side.close()


def test_a_failed_load_on_another_rank_withholds_this_ranks_stores_too(tmp_path):
    asked = []

    def another_rank_failed(failed: list[bool]) -> list[bool]:
        asked.append(list(failed))
        return [True] * len(failed)

    store = ChunkStore(ChunkLayout(tmp_path, Namespace({"model": "m"})))
    side = one_group_worker(tmp_path, store, NAMES, PER_CHUNK, BLOCK, any_rank=another_rank_failed)
    side.register_kv_caches(dict(zip(NAMES, _caches())))
    side.save(LMCacheFSMetadata(saves=[SaveOp("w", KEYS[1], "", 0, (0, 1, 2, 3))]))
    assert _stored(side) == [KEYS[1]] and asked == []  # no loads in the step: no collective
    meta = LMCacheFSMetadata(loads=[LoadOp("r", KEYS[1], 0, (0, 1, 2, 3))],  # loads fine here
                             saves=[SaveOp("other", KEYS[0], "", 0, (8, 9, 10, 11))])
    side.load(meta)
    side.save(meta)
    assert side.take_failed_blocks() == set()
    assert asked == [[False]] and _stored(side) == [KEYS[1]]  # withheld: another rank failed
    side.close()
