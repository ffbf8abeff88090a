"""Scheduler side: finds cached prefixes and decides which chunks to store.

It only keeps books: no file is read or written here, only stat'ed through
the index. Keys come from vLLM's chained block hashes (the hash of the last
block of a chunk covers every token before it), so the same prefix has the
same key in every process and on every node that shares the hash seed.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Sequence

from lmcache_fs.storage.index import ChunkIndex

from .groups import GroupGeometry, loads_asynchronously
from .mamba_state import HandedStates, handed_states
from .metadata import HitSummary, LMCacheFSMetadata, LoadOp, SaveOp
from .vllm_compat import resumed_requests

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

_SAVE_REQUESTED_MAX = 100_000  # keys remembered as "already asked to store"
# A store asked for longer ago than this has landed or failed: check the disk again
# (another node may have evicted it, or our write may have hit a full disk).
SAVE_REQUESTED_TTL_S = 30.0
_LOADING_MAX = 100_000  # blocks of recent loads, remembered to name the chunk of a failed one
_NEVER = 1 << 62  # a request's next chunk to store once its KV is known to rest on a failed load


class GroupIndexes(NamedTuple):
    """One KV cache group as the scheduler sees it."""

    geometry: GroupGeometry
    indexes: Sequence[ChunkIndex]
    """The index of the group's chunk files on each rank: a hit needs them in all."""


@dataclass
class _Tracked:
    """A request whose full prompt chunks may still need storing."""

    request: "Request"
    block_ids: list[list[int]]
    """Per KV cache group (a windowed group's list has vLLM's null block where it freed one)."""
    next_chunk: int = 0


class SchedulerSide:
    """Lookup and store planning for one engine (all TP ranks)."""

    def __init__(self, groups: Sequence[GroupIndexes], chunk_size: int, block_size: int,
                 hash_block_size: int, can_load: bool, can_save: bool):
        """``groups``: every KV cache group of the engine (a plain full-attention model has
        one), in vLLM's order."""
        self.groups = [GroupIndexes(geometry, list(indexes)) for geometry, indexes in groups]
        self.indexes = [index for group in self.groups for index in group.indexes]
        """Every index: all groups, all ranks."""
        self.async_loads = loads_asynchronously(len(self.groups))
        """The engine loads asynchronously (see ``connector/worker.py``)."""
        self.chunk_size = chunk_size
        self.block_size = block_size
        self.blocks_per_chunk = chunk_size // block_size
        self._full = [g for g, (geo, _) in enumerate(self.groups) if geo.kind == "full"]
        self._windowed = [g for g, (geo, _) in enumerate(self.groups) if geo.kind != "full"]
        # Linear-attention state groups: their block tables are not append-only (vLLM nulls
        # and moves their blocks), so their saves take the blocks vLLM hands over instead.
        self._states = [g for g, (geo, _) in enumerate(self.groups) if geo.kind == "state"]
        self.hashes_per_chunk = chunk_size // hash_block_size
        self.can_load = can_load
        self.can_save = can_save
        self._local_tokens: dict[str, int] = {}
        self._tracked: dict[str, _Tracked] = {}
        self._pending_loads: list[LoadOp] = []
        self._pending_hits: dict[str, HitSummary] = {}
        self._save_requested: dict[str, float] = {}  # key -> when its store was planned
        # block id -> chunk key of planned loads, to name the chunk of a failed block. A
        # block's entry is replaced when it is loaded into again, and failures only ever
        # name blocks of loads, so finished requests need no clean-up.
        self._loading: dict[int, str] = {}
        # A worker holds back the saves of every step it runs between a failed load and the
        # step built after the failure was reported here (their KV may rest on the failed
        # blocks): these counters tell it, and the saves of the last steps are then released
        # (sound) or planned again (recomputed).
        self._failed_load_steps = 0
        self._recent_saves: deque[list[SaveOp]] = deque(maxlen=2)  # async scheduling: 2 steps
        self._released: list[str] = []  # held-back saves found sound, for the next metadata
        # Requests that finished with saves among the recent ones: their block ids.
        self._finished_blocks: dict[str, list[int]] = {}
        # Engines of several KV cache groups load asynchronously (vLLM takes failures of
        # such loads per request only): the chunk keys of each request's load in flight.
        self._async_load_keys: dict[str, set[str]] = {}
        self._pending_async: list[str] = []  # requests whose loads the next step runs

    # -- keys ---------------------------------------------------------------

    def chunk_keys(self, request: "Request", num_tokens: int) -> list[str]:
        """Keys of the full chunks among the first ``num_tokens`` tokens."""
        hashes = request.block_hashes
        n = min(num_tokens // self.chunk_size, len(hashes) // self.hashes_per_chunk)
        return [bytes(hashes[(c + 1) * self.hashes_per_chunk - 1]).hex() for c in range(n)]

    def _present(self, key: str, group: int = 0) -> bool:
        """Every rank holds ``group``'s file of chunk ``key``."""
        # A chunk this engine just asked to store is stat'ed afresh, not taken
        # from the negative cache: an immediate repeat of a prompt must hit.
        recheck = key in self._save_requested
        return all(index.contains(key, recheck) for index in self.groups[group][1])

    def _servable(self, keys: list[str], hit: int, local: int) -> bool:
        """Every windowed group's files hold each block a hit of ``hit`` tokens must load."""
        for group in self._windowed:
            geo = self.groups[group][0]
            for block in geo.needed_blocks(hit, local):
                chunk = block // self.blocks_per_chunk
                if block < geo.first_held_block(chunk) or not self._present(keys[chunk], group):
                    return False
        return True

    def _save_pending(self, key: str) -> bool:
        planned = self._save_requested.get(key)
        return planned is not None and time.monotonic() - planned < SAVE_REQUESTED_TTL_S

    # -- vLLM hooks ---------------------------------------------------------

    def may_hit(self, request: "Request") -> bool:
        """A cheap guess that a lookup will hit: the prompt's first chunk is on disk.

        (vLLM 0.34's ``may_load_async``, asked whenever a request enters the waiting
        queues: one set lookup, or one stat, per full-attention group and rank.)
        """
        if not self.can_load or (request.num_tokens - 1) // self.block_size * self.block_size \
                < self.chunk_size:
            return False
        key = self.chunk_keys(request, self.chunk_size)[0]
        return all(self._present(key, g) for g in self._full)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> int:
        """Block-aligned tokens beyond ``num_computed_tokens`` that chunk files hold."""
        self._local_tokens[request.request_id] = num_computed_tokens
        if not self.can_load:
            return 0
        # vLLM must compute at least the last prompt token to sample from it.
        loadable = (request.num_tokens - 1) // self.block_size * self.block_size
        keys = self.chunk_keys(request, loadable + self.chunk_size)
        hit_chunks = 0
        for key in keys:
            if not all(self._present(key, g) for g in self._full):
                break
            hit_chunks += 1
        hit = min(hit_chunks * self.chunk_size, loadable)
        # Windowed groups need only the blocks inside the window at the hit point: take the
        # longest hit whose window every one of them can fill (chunk-aligned below the last).
        while hit > num_computed_tokens and not self._servable(keys, hit, num_computed_tokens):
            hit = (hit - 1) // self.chunk_size * self.chunk_size
        return max(0, hit - num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        """Plan loads for a hit; start tracking the request for stores."""
        req_id = request.request_id
        local = self._local_tokens.pop(req_id, 0)
        block_ids = [list(ids) for ids in blocks.get_block_ids()]
        if self.can_save:
            self._tracked[req_id] = _Tracked(request, block_ids)
        hit = local + num_external_tokens
        self._pending_hits[req_id] = HitSummary(hit, request.num_tokens, local)
        if num_external_tokens <= 0:
            return
        if self.async_loads:
            self._pending_async.append(req_id)
        keys = self.chunk_keys(request, hit + self.chunk_size - 1)
        if len(self._loading) > _LOADING_MAX:
            self._loading.clear()
        for group, (geo, _) in enumerate(self.groups):
            ids = block_ids[group]
            first = local // self.block_size
            if geo.kind != "full":  # vLLM's null block stands before the window: never loaded
                first = geo.needed_blocks(hit, local).start
                # (the hit was sized with vLLM's own window arithmetic: a null block here
                # would be a bug, and loading into it would give every request wrong KV)
                assert not any(b.is_null for b in blocks.blocks[group][first:hit // self.block_size]), \
                    f"lmcache-fs: vLLM allocated no block for a load of group {group}"
            for block in range(first, hit // self.block_size):
                chunk = block // self.blocks_per_chunk
                self._plan_load(LoadOp(req_id, keys[chunk], block - geo.first_held_block(chunk),
                                       (ids[block],), group))

    def _plan_load(self, op: LoadOp) -> None:
        """Add one block's load, merged into the previous one of the same chunk file."""
        self._loading[op.block_ids[0]] = op.key
        if self.async_loads:
            self._async_load_keys.setdefault(op.req_id, set()).add(op.key)
        last = self._pending_loads[-1] if self._pending_loads else None
        if last and (last.req_id, last.key, last.group) == (op.req_id, op.key, op.group):
            self._pending_loads[-1] = LoadOp(op.req_id, op.key, last.first_block,
                                             last.block_ids + op.block_ids, op.group)
        else:
            self._pending_loads.append(op)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> LMCacheFSMetadata:
        """This step's loads (planned at allocation) and saves (chunks this step completes)."""
        meta = LMCacheFSMetadata(loads=self._pending_loads, hits=self._pending_hits,
                                 failed_load_steps=self._failed_load_steps,
                                 released_saves=self._released, async_loads=self._pending_async)
        self._pending_loads, self._pending_hits, self._released = [], {}, []
        self._pending_async = []
        if not self.can_save:
            return meta
        scheduled = scheduler_output.num_scheduled_tokens
        states = handed_states(scheduler_output)
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._tracked.get(new.req_id)
            if tracked is not None:
                tracked.block_ids = [list(ids) for ids in new.block_ids]
                self._plan_saves(tracked, new.num_computed_tokens + scheduled[new.req_id], meta,
                                 states.get(new.req_id, {}))
        # A preempted request that runs again comes with its whole new block table: as a new
        # request (vLLM 0.34), or as a resumed cached one (0.32, 0.33).
        cached = scheduler_output.scheduled_cached_reqs
        resumed = resumed_requests(cached)
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in resumed:
                tracked.block_ids = ([list(ids) for ids in new_ids] if new_ids
                                     else [[] for _ in self.groups])
            elif new_ids:
                for ids, more in zip(tracked.block_ids, new_ids):
                    ids.extend(more)
            self._plan_saves(tracked, cached.num_computed_tokens[i] + scheduled.get(req_id, 0), meta,
                             states.get(req_id, {}))
        self._recent_saves.append(meta.saves)
        if self._finished_blocks:  # keep only those whose saves are still recent
            recent = {op.req_id for saves in self._recent_saves for op in saves}
            self._finished_blocks = {r: b for r, b in self._finished_blocks.items() if r in recent}
        return meta

    def forget(self, namespace: str | None, key: str) -> None:
        """Chunk ``key`` is gone (evicted, quarantined) from ``namespace`` (None: from all).

        Stop offering it and allow storing it again.
        """
        for index in self.indexes:
            if namespace is None or index.layout.namespace.name == namespace:
                index.discard(key)
        self._save_requested.pop(key, None)

    def loads_failed(self, block_ids: set[int]) -> None:
        """Loads of these blocks failed (on some rank): forget their chunks, and decide for
        each request which of its chunks may still be stored.

        Called once vLLM has handled the failure: every request it recomputes
        is reset to its first failed block, and its chunks from there are stored
        again once recomputed (on NFS no event reports another node's eviction:
        without this the prefix would never be stored again). A request that
        holds a failed block but was not reset (it shares the block with one that
        recomputes it, and had already computed past it, as async scheduling
        allows) keeps KV computed over blocks without KV: none of its later chunks
        is stored. The workers held back every save since the failure (see
        ``GroupWorker.save``): those of requests that hold no failed block rest
        on sound KV and are released in the next step's metadata, including
        those of requests that finished meanwhile (their blocks are freed, the
        workers hold a copy); the others are dropped, and planned again where
        the request recomputes them.
        """
        if not block_ids:
            return
        self._failed_load_steps += 1
        for block in block_ids:
            if block in self._loading:
                self.forget(None, self._loading.pop(block))
        for saves in self._recent_saves:
            for op in saves:
                blocks = self._blocks_of(op.req_id)
                upto = (op.chunk_index + 1) * self.blocks_per_chunk
                if blocks is not None and block_ids.isdisjoint(blocks[:upto]):
                    self._released.append(op.key)  # sound: stored from the workers' copy
                    continue
                self._save_requested.pop(op.key, None)
                tracked = self._tracked.get(op.req_id)
                if tracked is not None:
                    tracked.next_chunk = min(tracked.next_chunk, op.chunk_index)
        self._recent_saves.clear()
        self._finished_blocks.clear()
        for tracked in self._tracked.values():
            first_bad = next((i for i, b in enumerate(tracked.block_ids[0]) if b in block_ids),
                             None)
            if first_bad is None:
                continue
            if tracked.request.num_computed_tokens <= first_bad * self.block_size:
                tracked.next_chunk = min(tracked.next_chunk, first_bad // self.blocks_per_chunk)
            else:
                tracked.next_chunk = _NEVER

    def async_loads_done(self, finished: set[str], failed: set[str]) -> None:
        """Asynchronous loads ended (several KV cache groups); ``failed`` ones recompute.

        vLLM recomputes a failed request from its first token: its chunks are
        forgotten (a damaged file was quarantined by the worker, an evicted one
        is gone) and stored again as the request recomputes them.
        """
        for req_id in failed:
            for key in self._async_load_keys.pop(req_id, ()):
                self.forget(None, key)
        for req_id in finished:
            self._async_load_keys.pop(req_id, None)

    def _blocks_of(self, req_id: str) -> list[int] | None:
        """The block ids of a tracked request, or of one that finished in the last steps
        (engines of one KV cache group: the only ones that report failed blocks)."""
        tracked = self._tracked.get(req_id)
        return tracked.block_ids[0] if tracked is not None else self._finished_blocks.get(req_id)

    def request_finished(self, request: "Request") -> None:
        """Forget the request (saves were issued in the step that computed them).

        Its block ids are kept while saves of it from the last steps may be
        held back by the workers (see :meth:`loads_failed`).
        """
        tracked = self._tracked.pop(request.request_id, None)
        self._local_tokens.pop(request.request_id, None)
        self._async_load_keys.pop(request.request_id, None)
        if tracked is not None and any(op.req_id == request.request_id
                                       for saves in self._recent_saves for op in saves):
            self._finished_blocks[request.request_id] = tracked.block_ids[0]

    # -- stores -------------------------------------------------------------

    def _held_blocks(self, tracked: _Tracked, group: int, chunk: int,
                     states: HandedStates) -> tuple[int, ...]:
        """The blocks of ``chunk`` that ``group``'s file holds, as this step leaves them.

        Attention groups: from the block table, all still real blocks (vLLM frees
        them later, not before). A state group: the block vLLM handed over with the
        state at the chunk's end, or none (no state was kept there).
        """
        stop = (chunk + 1) * self.blocks_per_chunk
        if self.groups[group][0].kind == "state":
            block = states.get((group, stop * self.block_size))
            return () if block is None else (block,)
        return tuple(tracked.block_ids[group][self.groups[group][0].first_held_block(chunk):stop])

    def _plan_saves(self, tracked: _Tracked, computed_after_step: int,
                    meta: LMCacheFSMetadata, states: HandedStates) -> None:
        request = tracked.request
        if tracked.next_chunk >= request.num_prompt_tokens // self.chunk_size:
            return  # every full prompt chunk is planned (decode steps end here)
        # Only prompt chunks are stored: they are what later requests share.
        upto = min(computed_after_step, request.num_prompt_tokens)
        keys = self.chunk_keys(request, upto)
        for chunk in range(tracked.next_chunk, len(keys)):
            key = keys[chunk]
            stop = (chunk + 1) * self.blocks_per_chunk
            if any(len(ids) < stop for g, ids in enumerate(tracked.block_ids)
                   if g not in self._states):
                break
            tracked.next_chunk = chunk + 1
            held = {g: self._held_blocks(tracked, g, chunk, states) for g in range(len(self.groups))}
            missing = [g for g, blocks in held.items() if blocks and not self._present(key, g)]
            if self._save_pending(key):  # but a state: vLLM hands it over this once
                missing = [g for g in missing if g in self._states]
            if not missing:
                continue
            if len(self._save_requested) > _SAVE_REQUESTED_MAX:
                self._save_requested.clear()
            self._save_requested[key] = time.monotonic()
            parent = keys[chunk - 1] if chunk else ""
            for g in missing:
                meta.saves.append(SaveOp(request.request_id, key, parent, chunk, held[g], g))
