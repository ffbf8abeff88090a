"""What engines lmcache-fs refuses at start-up: those whose KV it could not store and load faithfully."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.v1.kv_cache_interface import (
    ChunkedLocalAttentionSpec,
    FullAttentionSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
)

from lmcache_fs.config import ConfigError

from .mamba_state import check_state_group, is_state_spec
from .namespace import layer_specs
from .vllm_compat import drafter_keeps_kv

if TYPE_CHECKING:
    from vllm.config import ParallelConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


# KV cache specs whose blocks lmcache-fs stores (see connector/groups.py). Exact types:
# a subclass (sink attention, sliding-window MLA...) keeps KV these rules do not describe.
_STORED_SPECS = (FullAttentionSpec, MLAAttentionSpec, SlidingWindowSpec, ChunkedLocalAttentionSpec)


def check_supported(kv_cache_config: "KVCacheConfig", parallel: "ParallelConfig",
                    speculative: Any = None) -> None:
    """Refuse engines whose KV lmcache-fs could not store and load faithfully.

    - KV cache groups other than full, sliding-window and chunked-local attention
      and Gated DeltaNet states (see ``check_state_group`` for the states it refuses:
      other kinds, cache modes other than align, speculative decoding), and engines
      of linear-attention layers alone (untested: no attention layer waits for a load).
    - Groups of different block sizes: one chunk spans the same blocks in every group.
    - Pipeline parallelism: a stage whose load fails cannot tell the others before
      they store what they computed over it (vLLM keeps several steps in flight).
    - Context parallelism: each rank holds only some tokens of a block.
    - A speculative decoder with a KV cache of its own (EAGLE, MTP, a draft model):
      its KV at a chunk's last positions depends on tokens past the chunk.

    Raises:
        ConfigError: naming the reason and the fix.
    """
    groups = kv_cache_config.kv_cache_groups
    for group in groups:
        for one in layer_specs(group.kv_cache_spec):
            if is_state_spec(one):
                check_state_group(one, group.layer_names[0], len(group.layer_names), speculative)
            elif type(one) not in _STORED_SPECS:
                raise ConfigError(
                    f"lmcache-fs cannot store the KV cache of layer {group.layer_names[0]} "
                    f"({len(group.layer_names)} layers of this kind): its spec is "
                    f"{type(one).__name__}, a kind lmcache-fs does not store (it stores full, "
                    "sliding-window and chunked-local attention and Gated DeltaNet states): "
                    "remove the kv-transfer-config")
    if all(is_state_spec(layer_specs(g.kv_cache_spec)[0]) for g in groups):
        raise ConfigError("lmcache-fs does not store models of linear-attention layers alone "
                          "(untested: it serves hybrids such as Qwen3-Next, whose attention "
                          "layers are there too): remove the kv-transfer-config")
    block_sizes = {int(g.kv_cache_spec.block_size) for g in groups}
    if len(block_sizes) > 1:
        raise ConfigError(f"lmcache-fs needs one block size in every KV cache group; this engine "
                          f"has {sorted(block_sizes)}: set --block-size, or remove the "
                          "kv-transfer-config")
    if parallel.pipeline_parallel_size > 1:
        raise ConfigError(f"lmcache-fs does not support pipeline parallelism (pipeline_parallel_size="
                          f"{parallel.pipeline_parallel_size}): a failed load on one stage could leave "
                          "wrong KV stored by the others; use tensor parallelism, or remove the "
                          "kv-transfer-config")
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        # Context parallelism spreads a block's tokens over ranks: vLLM's scheduler blocks
        # are then larger than the KV cache's, which chunk keys and block copies assume equal.
        if getattr(parallel, name, 1) > 1:
            raise ConfigError(f"lmcache-fs does not support context parallelism ({name}="
                              f"{getattr(parallel, name)}): set it to 1, or remove the "
                              "kv-transfer-config")
    if drafter_keeps_kv(speculative):
        raise ConfigError(f"lmcache-fs does not store the KV cache of a speculative decoder "
                          f"(method {speculative.method!r} keeps one: its KV at a chunk's end "
                          "depends on tokens past the chunk, which chunk keys do not cover): use "
                          "the 'ngram' or 'suffix' method, or remove the kv-transfer-config")
