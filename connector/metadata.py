"""What the scheduler tells the workers each step (small and picklable)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(frozen=True)
class LoadOp:
    """Copy blocks ``first_block..`` of chunk ``key`` into ``block_ids`` of the paged cache."""

    req_id: str
    key: str
    first_block: int
    block_ids: tuple[int, ...]
    group: int = 0
    """The KV cache group (hybrid models: each group has its own chunk files)."""


@dataclass(frozen=True)
class SaveOp:
    """Gather ``block_ids`` (one whole chunk of request ``req_id``) and publish them as ``key``."""

    req_id: str
    key: str
    parent_key: str
    chunk_index: int
    block_ids: tuple[int, ...]
    group: int = 0
    """The KV cache group; ``block_ids`` are the blocks of the chunk its files hold."""


@dataclass(frozen=True)
class HitSummary:
    """For the per-request log line: tokens found in the cache and prompt length."""

    hit_tokens: int
    total_tokens: int
    local_tokens: int


@dataclass
class LMCacheFSMetadata(KVConnectorMetadata):
    """One step's loads (run before the forward pass) and saves (after it)."""

    loads: list[LoadOp] = field(default_factory=list)
    saves: list[SaveOp] = field(default_factory=list)
    hits: dict[str, HitSummary] = field(default_factory=dict)
    failed_load_steps: int = 0
    """Steps with failed loads that the scheduler had heard of when it built this one."""
    async_loads: list[str] = field(default_factory=list)
    """Requests whose (asynchronous) loads this step runs: reported received at its end."""
    released_saves: list[str] = field(default_factory=list)
    """Keys of saves held back after a failed load that rest only on sound blocks: publish them."""
