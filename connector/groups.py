"""KV cache groups: which blocks of a chunk each group stores, and which a hit needs.

vLLM's hybrid KV cache manager gives each kind of attention its own group. A
full-attention group keeps every block of a prompt. A sliding-window group
keeps only the blocks inside the window of the next token: vLLM frees the
others and puts its null block in their place (``remove_skipped_blocks``); a
chunked-local group keeps only the blocks of the current attention chunk.

A linear-attention (state) group keeps one state per cached block boundary
(see ``connector/mamba_state.py``): a hit needs only the state at its end.

So a chunk file of a windowed group holds only the blocks that a later hit can
need: the blocks of chunk ``c`` inside the window at the end of chunk ``c``
(a hit further on needs fewer of them, never more, as the window only moves
right). Each group has its own files (one namespace per group), so every file
keeps the plain single-tensor chunk format.

The arithmetic follows vLLM 0.32's ``SingleTypeKVCacheManager.get_num_skipped_tokens``
(``SlidingWindowManager``, ``ChunkedLocalAttentionManager``, ``MambaManager``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GroupGeometry:
    """One KV cache group as lmcache-fs stores it.

    Attributes:
        kind: ``full``, ``sliding_window``, ``chunked_local`` or ``state`` (linear
            attention: one state per block boundary, in a block table that is not
            append-only).
        window: the sliding window, or the attention chunk size, in tokens (0 for full).
        extra_retained: tokens vLLM keeps below the window (``extra_retained_tokens``).
        block_size: tokens per block.
        blocks_per_chunk: blocks of one lmcache-fs chunk.
        held_blocks: blocks of each chunk that this group's files hold (the last ones).
    """

    kind: str
    window: int
    extra_retained: int
    block_size: int
    blocks_per_chunk: int
    held_blocks: int

    def skipped_tokens(self, num_computed_tokens: int) -> int:
        """Tokens before the attention window of the next token (vLLM's null blocks cover them)."""
        if self.kind == "sliding_window":
            return max(0, num_computed_tokens - self.window + 1 - self.extra_retained)
        if self.kind == "chunked_local":
            return num_computed_tokens // self.window * self.window
        if self.kind == "state":  # only the state after the last computed token is needed
            return max(0, num_computed_tokens - 1)
        return 0

    def first_held_block(self, chunk: int) -> int:
        """Absolute index of the first block of ``chunk`` that its file holds."""
        return (chunk + 1) * self.blocks_per_chunk - self.held_blocks

    def needed_blocks(self, hit_tokens: int, local_tokens: int) -> range:
        """Blocks a hit of ``hit_tokens`` must load when ``local_tokens`` are in vLLM's cache.

        These are exactly the blocks vLLM allocates real blocks for: not those
        before the window at the hit point, nor those its local prefix cache holds.
        A full-attention group needs every block from the first one: a hit
        there needs the whole prefix on disk (as with a single group).
        """
        first = self.skipped_tokens(hit_tokens) // self.block_size if self.kind != "full" else 0
        if self.kind != "full":
            first = max(first, local_tokens // self.block_size)
        return range(first, hit_tokens // self.block_size)


def geometry_of(spec: Any, chunk_size: int) -> GroupGeometry:
    """The geometry of a vLLM KV cache spec (one checked by ``check_supported``)."""
    from vllm.v1.kv_cache_interface import ChunkedLocalAttentionSpec, SlidingWindowSpec

    from .mamba_state import is_state_spec

    block_size = int(spec.block_size)
    per_chunk = chunk_size // block_size
    if is_state_spec(spec):  # the state at the chunk's end, in its last block
        return GroupGeometry("state", 0, 0, block_size, per_chunk, 1)
    if isinstance(spec, SlidingWindowSpec):
        extra = int(getattr(spec, "extra_retained_tokens", 0) or 0)
        window = int(spec.sliding_window)
        # Blocks of chunk c skipped at the hit (c + 1) * chunk_size: the same for every c.
        skipped = max(0, chunk_size - window + 1 - extra) // block_size
        return GroupGeometry("sliding_window", window, extra, block_size, per_chunk,
                             max(1, per_chunk - skipped))
    if isinstance(spec, ChunkedLocalAttentionSpec):
        # Which blocks of a chunk a hit needs changes from chunk to chunk: keep them all.
        return GroupGeometry("chunked_local", int(spec.attention_chunk_size), 0, block_size,
                             per_chunk, per_chunk)
    return GroupGeometry("full", 0, 0, block_size, per_chunk, per_chunk)


def describe_groups(specs: list[Any], layer_counts: list[int], chunk_size: int) -> str:
    """Every group's spec as one namespace field: engines whose groups differ share no file."""
    from .mamba_state import describe_state_group, is_state_spec

    described = []
    for spec, layers in zip(specs, layer_counts):
        if is_state_spec(spec):
            described.append(describe_state_group(spec, layers))
            continue
        geo = geometry_of(spec, chunk_size)
        described.append({"type": type(spec).__name__, "layers": layers,
                          "window": geo.window, "extra_retained": geo.extra_retained,
                          "held_blocks": geo.held_blocks, "block_size": geo.block_size,
                          "num_kv_heads": int(spec.num_kv_heads), "head_size": int(spec.head_size),
                          "dtype": str(spec.dtype).removeprefix("torch.")})
    return json.dumps(described, sort_keys=True, separators=(",", ":"))


def loads_asynchronously(num_groups: int) -> bool:
    """Whether an engine of ``num_groups`` KV cache groups loads asynchronously.

    vLLM 0.32 cannot map failed block ids back to requests when there are
    several groups (``Scheduler._handle_invalid_blocks`` refuses them), so such
    engines load asynchronously and report failures per request (see
    ``connector/worker.py``); an engine of one group loads synchronously.
    """
    return num_groups > 1
