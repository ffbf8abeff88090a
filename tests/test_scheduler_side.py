"""Scheduler-side planning: block-aligned hits, the right blocks loaded, each chunk stored once."""

import pytest

pytest.importorskip("vllm")

from vllm_objects import as_of_0_34, blocks, cached_requests, new_request, request, step  # noqa: E402

from lmcache_fs.connector.groups import GroupGeometry  # noqa: E402
from lmcache_fs.connector.scheduler import GroupIndexes, SchedulerSide  # noqa: E402

from lmcache_fs.storage.index import ChunkIndex  # noqa: E402
from lmcache_fs.storage.layout import ChunkLayout, Namespace  # noqa: E402

BLOCK, CHUNK = 16, 64  # 4 blocks per chunk


def _request(req_id, num_tokens, salt=b""):
    return request(req_id, num_tokens, BLOCK, salt)


def _side(tmp_path, can_load=True, can_save=True):
    index = ChunkIndex(ChunkLayout(tmp_path, Namespace({"model": "m"})), negative_ttl_s=0)
    full = GroupGeometry("full", 0, 0, BLOCK, CHUNK // BLOCK, CHUNK // BLOCK)
    return SchedulerSide([GroupIndexes(full, [index])], CHUNK, BLOCK, BLOCK, can_load,
                         can_save), index


def _blocks(ids):
    return blocks(list(ids))


def test_hit_is_whole_chunks_and_leaves_the_last_token_to_compute(tmp_path):
    side, index = _side(tmp_path)
    req = _request("r", 4 * CHUNK)  # 256 tokens, 4 chunks
    for key in side.chunk_keys(req, req.num_tokens):
        index.add(key)
    # All four chunks exist, but the last token must be computed: 255 -> 240 (block-aligned).
    assert side.get_num_new_matched_tokens(req, 0) == 4 * CHUNK - BLOCK
    # Tokens already in the local prefix cache are not counted again.
    assert side.get_num_new_matched_tokens(req, 2 * CHUNK) == 2 * CHUNK - BLOCK


def test_gap_stops_the_hit(tmp_path):
    side, index = _side(tmp_path)
    req = _request("r", 5 * CHUNK)
    keys = side.chunk_keys(req, req.num_tokens)
    for key in (keys[0], keys[1], keys[3]):
        index.add(key)
    assert side.get_num_new_matched_tokens(req, 0) == 2 * CHUNK


def test_consumer_only_role_never_plans_saves(tmp_path):
    side, _ = _side(tmp_path, can_save=False)
    req = _request("r", 2 * CHUNK)
    side.get_num_new_matched_tokens(req, 0)
    side.update_state_after_alloc(req, _blocks(range(8)), 0)
    new = new_request(req, (list(range(8)),), 0)
    assert side.build_connector_meta(step([new], scheduled={"r": 2 * CHUNK})).saves == []


def test_loads_target_the_blocks_after_the_local_prefix(tmp_path):
    side, index = _side(tmp_path)
    req = _request("r", 3 * CHUNK + 5)
    for key in side.chunk_keys(req, req.num_tokens):
        index.add(key)
    ext = side.get_num_new_matched_tokens(req, BLOCK)  # one block already local
    assert ext == 3 * CHUNK - BLOCK
    block_ids = list(range(100, 113))
    side.update_state_after_alloc(req, _blocks(block_ids), ext)
    meta = side.build_connector_meta(step())
    keys = side.chunk_keys(req, req.num_tokens)
    assert [(op.key, op.first_block, op.block_ids) for op in meta.loads] == [
        (keys[0], 1, (101, 102, 103)),
        (keys[1], 0, (104, 105, 106, 107)),
        (keys[2], 0, (108, 109, 110, 111)),
    ]
    assert meta.hits["r"].hit_tokens == 3 * CHUNK and meta.hits["r"].local_tokens == BLOCK


def test_chunked_prefill_saves_each_chunk_once_when_it_is_complete(tmp_path):
    side, _ = _side(tmp_path)
    req = _request("r", 3 * CHUNK + 10)
    side.get_num_new_matched_tokens(req, 0)
    ids = list(range(13))
    side.update_state_after_alloc(req, _blocks(ids[:6]), 0)
    keys = side.chunk_keys(req, req.num_tokens)
    # Step 1: 96 tokens computed: only chunk 0 (64 tokens) is complete.
    new = new_request(req, (ids[:6],), 0)
    saves = side.build_connector_meta(step([new], scheduled={"r": 96})).saves
    assert [(s.key, s.chunk_index, s.block_ids, s.parent_key) for s in saves] == [
        (keys[0], 0, (0, 1, 2, 3), "")]
    # Step 2: up to 202 tokens: chunks 1 and 2 complete.
    cached = cached_requests(("r", 96, (ids[6:],)))
    saves = side.build_connector_meta(step(cached=cached, scheduled={"r": 106})).saves
    assert [(s.chunk_index, s.block_ids, s.parent_key) for s in saves] == [
        (1, (4, 5, 6, 7), keys[0]), (2, (8, 9, 10, 11), keys[1])]


def test_chunks_already_on_disk_or_already_queued_are_not_rewritten(tmp_path):
    side, index = _side(tmp_path)
    first, second = _request("a", 2 * CHUNK), _request("b", 2 * CHUNK)  # same tokens
    index.add(side.chunk_keys(first, CHUNK)[0])
    for req in (first, second):
        side.get_num_new_matched_tokens(req, 0)
        side.update_state_after_alloc(req, _blocks(range(8)), 0)
    news = [new_request(r, (list(range(8)),), 0) for r in (first, second)]
    saves = side.build_connector_meta(step(news, scheduled={"a": 128, "b": 128})).saves
    assert [s.chunk_index for s in saves] == [1]


def test_different_prefixes_give_different_keys(tmp_path):
    side, _ = _side(tmp_path)
    a, b = _request("a", CHUNK), _request("b", CHUNK, salt=b"lora")
    assert side.chunk_keys(a, CHUNK) != side.chunk_keys(b, CHUNK)


def test_failed_load_forgets_the_chunk_and_stores_the_recomputed_one_again(tmp_path):
    side, index = _side(tmp_path)
    req = _request("r", 3 * CHUNK + 5)
    keys = side.chunk_keys(req, req.num_tokens)
    for key in keys:
        index.add(key)
    ext = side.get_num_new_matched_tokens(req, 0)
    ids = list(range(13))
    side.update_state_after_alloc(req, _blocks(ids), ext)
    new = new_request(req, (ids,), 0)
    assert side.build_connector_meta(step([new], scheduled={"r": 5})).saves == []  # all present
    # Another node evicted chunk 1: its blocks 4..7 failed to load.
    index.discard(keys[1])
    side.loads_failed({4, 5, 6, 7})
    assert keys[1] not in index._keys
    cached = cached_requests(("r", CHUNK, None))
    saves = side.build_connector_meta(step(cached=cached, scheduled={"r": 2 * CHUNK + 5})).saves
    assert [s.key for s in saves] == [keys[1]]  # chunk 2 is still on disk


def test_a_chunk_just_planned_for_storing_is_found_at_once_despite_the_negative_cache(tmp_path):
    side, index = _side(tmp_path)
    index.negative_ttl_s = 60.0
    req = _request("r", CHUNK + 1)
    side.get_num_new_matched_tokens(req, 0)  # miss: now in the negative cache
    side.update_state_after_alloc(req, _blocks(range(5)), 0)
    new = new_request(req, (list(range(5)),), 0)
    (save,) = side.build_connector_meta(step([new], scheduled={"r": CHUNK + 1})).saves
    path = index.layout.chunk_path(save.key)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"published by the worker")
    again = _request("again", CHUNK + 1)
    assert side.get_num_new_matched_tokens(again, 0) == CHUNK


def _hit_then_compute(side, index, req_id="r", salt=b""):
    """Request with chunk 0 on disk: a step that loads it and computes chunks 1 and 2."""
    req = _request(req_id, 3 * CHUNK + 5, salt)
    keys = side.chunk_keys(req, req.num_tokens)
    index.add(keys[0])
    ext = side.get_num_new_matched_tokens(req, 0)
    assert ext == CHUNK
    ids = list(range(13))
    side.update_state_after_alloc(req, _blocks(ids), ext)
    new = new_request(req, (ids,), CHUNK)
    return keys, side.build_connector_meta(step([new], scheduled={req_id: 2 * CHUNK + 5}))


def _decode_step(side, req_id, computed):
    cached = cached_requests((req_id, computed, None))
    return side.build_connector_meta(step(cached=cached, scheduled={req_id: 1}))


def test_a_reported_failed_load_plans_the_withheld_saves_of_the_last_steps_again(tmp_path):
    side, index = _side(tmp_path)
    keys, meta = _hit_then_compute(side, index)
    assert [s.key for s in meta.saves] == keys[1:3] and meta.failed_load_steps == 0
    assert _decode_step(side, "r", 3 * CHUNK + 5).saves == []  # async: built before the report
    # The report: the load of chunk 0 failed on some rank. The workers withheld chunks 1
    # and 2; vLLM recomputes from block 0, and the scheduler asks for them again.
    side.loads_failed({0, 1, 2, 3})
    meta = _decode_step(side, "r", 3 * CHUNK + 5)  # (tokens as vLLM counts once recomputed)
    assert meta.failed_load_steps == 1
    assert [s.key for s in meta.saves] == keys[:3]  # chunk 0 too: it is gone or bad


def test_a_request_that_computed_over_a_failed_block_without_being_reset_stores_no_more(tmp_path):
    # "a" loaded blocks 0..3 (chunk 0) and failed; "b" came a step later with a local hit
    # on those blocks and computed its chunks 1 and 2 over them. vLLM resets only "a"
    # (the one that recomputes the shared block): b's KV past block 0 rests on nothing.
    side, index = _side(tmp_path)
    keys, _ = _hit_then_compute(side, index, "a")
    b = _request("b", 3 * CHUNK + 5, salt=b"other question")
    b.block_hashes[:CHUNK // BLOCK] = side._tracked["a"].request.block_hashes[:CHUNK // BLOCK]
    side.get_num_new_matched_tokens(b, CHUNK)
    side.update_state_after_alloc(b, _blocks([0, 1, 2, 3] + list(range(20, 29))), 0)
    new = new_request(b, ([0, 1, 2, 3] + list(range(20, 29)),), CHUNK)
    side.build_connector_meta(step([new], scheduled={"b": 2 * CHUNK + 5}))
    side._tracked["a"].request.num_computed_tokens = 0  # what vLLM does before telling us
    side._tracked["b"].request.num_computed_tokens = 3 * CHUNK + 5
    side.loads_failed({0, 1, 2, 3})
    assert [s.key for s in _decode_step(side, "a", 3 * CHUNK + 5).saves] == keys[:3]
    assert _decode_step(side, "b", 3 * CHUNK + 6).saves == []  # b's own chunks 1 and 2: never


@pytest.mark.parametrize("release", ["0.32", "0.34"])
def test_a_preempted_request_that_runs_again_stores_from_its_new_block_table(tmp_path, release):
    # vLLM 0.32/0.33 send a resumed request as a cached one listed in resumed_req_ids, with
    # its whole new block table; 0.34 sends it as a new request, and its cached requests'
    # new_block_ids are only ever appended.
    side, _ = _side(tmp_path)
    req, other = _request("r", 3 * CHUNK + 10), _request("o", 2 * CHUNK, salt=b"other")
    for r, ids in ((req, range(13)), (other, range(50, 58))):
        side.get_num_new_matched_tokens(r, 0)
        side.update_state_after_alloc(r, _blocks(ids), 0)
    first = side.build_connector_meta(step(
        [new_request(req, (list(range(6)),), 0), new_request(other, (list(range(50, 54)),), 0)],
        scheduled={"r": 96, "o": CHUNK}))
    keys = side.chunk_keys(req, req.num_tokens)
    assert [(s.key, s.block_ids) for s in first.saves if s.req_id == "r"] == [(keys[0], (0, 1, 2, 3))]
    # Preempted: its blocks are freed; back in the waiting queue, it is looked up again
    # and gets other blocks.
    side.get_num_new_matched_tokens(req, 0)
    moved = list(range(100, 113))
    side.update_state_after_alloc(req, _blocks(moved), 0)
    running = ("o", CHUNK, (list(range(54, 58)),))
    scheduled = {"r": 3 * CHUNK + 10, "o": CHUNK}
    if release == "0.32":
        output = step(cached=cached_requests(("r", 0, (moved,)), running, resumed={"r"}),
                      scheduled=scheduled)
    else:
        output = as_of_0_34(step([new_request(req, (moved,), 0)], cached_requests(running),
                                 scheduled=scheduled))
    saves = side.build_connector_meta(output).saves
    assert [(s.key, s.block_ids) for s in saves if s.req_id == "r"] == [
        (keys[1], (104, 105, 106, 107)), (keys[2], (108, 109, 110, 111))]  # chunk 0: stored
    assert [s.block_ids for s in saves if s.req_id == "o"] == [(54, 55, 56, 57)]


def test_may_hit_is_a_cheap_guess_from_the_first_chunk(tmp_path):
    # vLLM 0.34 asks it (as may_load_async) whenever a request enters the waiting queues.
    side, index = _side(tmp_path)
    req = _request("r", 3 * CHUNK)
    assert not side.may_hit(req)
    index.add(side.chunk_keys(req, CHUNK)[0])
    assert side.may_hit(req)
    assert not side.may_hit(_request("short", CHUNK))  # one chunk, last token computed: no hit
    consumer_less, _ = _side(tmp_path, can_load=False)
    assert not consumer_less.may_hit(req)
