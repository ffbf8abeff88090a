"""Saves held back after a failed load: sound ones are stored, even for requests that finished.

The scheduler and a worker side by side, as vLLM drives them: a step in which
one request's load fails while another request computes its own chunks and
finishes. The worker holds every save of that step back; the scheduler, told of
the failure after vLLM freed the finished request's blocks, releases the
chunks that rest only on sound blocks, and the worker stores them from the
copy it took when they were computed.
"""

import pytest
import torch

pytest.importorskip("vllm")

from test_scheduler_side import CHUNK, _blocks, _request, _side  # noqa: E402
from vllm_objects import cached_requests, new_request, step  # noqa: E402
from test_worker_side import _caches, _stored, _worker  # noqa: E402


def _first_step(tmp_path):
    """"a" hits chunk 0 (listed, but its file is missing); "b" computes two chunks, no hit."""
    scheduler, index = _side(tmp_path)
    worker = _worker(tmp_path, _caches())
    a = _request("a", 3 * CHUNK + 5)
    b = _request("b", 2 * CHUNK + 5, salt=b"another tenant")
    keys_a = scheduler.chunk_keys(a, a.num_tokens)
    keys_b = scheduler.chunk_keys(b, b.num_tokens)
    index.add(keys_a[0])  # the index says it exists; the file was evicted meanwhile
    blocks_a, blocks_b = list(range(13)), list(range(20, 29))
    hit = scheduler.get_num_new_matched_tokens(a, 0)
    scheduler.update_state_after_alloc(a, _blocks(blocks_a), hit)
    scheduler.get_num_new_matched_tokens(b, 0)
    scheduler.update_state_after_alloc(b, _blocks(blocks_b), 0)
    new = [new_request(a, (blocks_a,), CHUNK), new_request(b, (blocks_b,), 0)]
    meta = scheduler.build_connector_meta(step(new, scheduled={"a": 2 * CHUNK + 5,
                                                               "b": 2 * CHUNK + 5}))
    assert {s.key for s in meta.saves} == set(keys_a[1:3] + keys_b[:2])
    worker.load(meta)
    worker.save(meta)
    return scheduler, worker, (a, b), (keys_a, keys_b)


def _stored_keys(store, keys):
    return [k for k in keys if store.layout.chunk_path(k).exists()]


def _chunk_bytes(worker, blocks):
    return torch.stack([layer[blocks] for layer in worker.groups[0].layers]).clone()


def test_a_request_that_finishes_in_the_withheld_step_still_gets_its_chunks_stored(tmp_path):
    scheduler, worker, (a, b), (keys_a, keys_b) = _first_step(tmp_path)
    computed = [_chunk_bytes(worker, list(range(20, 24))), _chunk_bytes(worker, list(range(24, 28)))]
    assert _stored(worker) == []  # held back: the step's load failed
    # vLLM's output handling: "b" finished (its blocks are freed and reused at once), then
    # the failure is reported; "a" is reset to recompute from its failed block.
    failed = worker.take_failed_blocks()
    assert failed == {0, 1, 2, 3}  # chunk 0 of "a"
    scheduler.request_finished(b)
    for layer in worker.groups[0].layers:
        layer[20:28] = 0  # another request's KV now
    a.num_computed_tokens = 0
    scheduler.loads_failed(failed)
    after = scheduler.build_connector_meta(step())
    worker.load(after)
    worker.save(after)
    worker.groups[0].writer.flush()
    store = worker.groups[0].store
    assert _stored_keys(store, keys_b) == keys_b[:2]
    for key, want in zip(keys_b[:2], computed):
        out = torch.empty_like(want)
        store.load(key, out)
        assert torch.equal(out, want)  # the KV as computed, not the reused blocks
    assert _stored_keys(store, keys_a) == []  # rests on the failure
    worker.close()


def test_saves_resting_on_a_failed_block_are_dropped_and_planned_again(tmp_path):
    scheduler, worker, (a, _), (keys_a, _) = _first_step(tmp_path)
    failed = worker.take_failed_blocks()
    a.num_computed_tokens = 0
    scheduler.loads_failed(failed)
    after = scheduler.build_connector_meta(step())
    assert not set(after.released_saves) & set(keys_a)
    worker.save(after)
    worker.groups[0].writer.flush()
    assert _stored_keys(worker.groups[0].store, keys_a) == []
    assert worker.take_stats().data["skipped_stores"] == 2  # a's chunks 1 and 2
    cached = cached_requests(("a", 3 * CHUNK + 5, None))
    replanned = scheduler.build_connector_meta(step(cached=cached, scheduled={"a": 1}))
    assert [s.key for s in replanned.saves] == keys_a[:3]  # recomputed: stored again
    worker.close()
