"""The objects vLLM hands a connector's scheduler side, built from the installed vLLM's classes.

Requests carry real block hashes (vLLM's own hasher over their tokens); steps
are real ``SchedulerOutput``s. :func:`as_of_0_34` turns a step into what vLLM
0.34 sends (no ``resumed_req_ids``: a resumed request comes in
``scheduled_new_reqs``), the shape no installed vLLM can make here.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import Any, Iterable, Sequence

import torch

from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core import kv_cache_utils
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.sched.output import (
    CachedRequestData,
    KVConnectorBlockState,
    NewRequestData,
    SchedulerOutput,
)
from vllm.v1.request import Request

_HASH = get_hash_fn_by_name("sha256")
kv_cache_utils.init_none_hash(_HASH)


def request(req_id: str, num_tokens: int, block_size: int, salt: bytes = b"") -> Request:
    """A prompt of ``num_tokens`` tokens (its own tokens per ``salt``), hashed as vLLM does."""
    seed = int.from_bytes(hashlib.sha256(b"prompt" + salt).digest()[:4], "little")
    tokens = [(seed + 7919 * i) % 50_000 for i in range(num_tokens)]
    return Request(req_id, tokens, SamplingParams(max_tokens=16), None,
                   block_hasher=kv_cache_utils.get_request_block_hasher(block_size, _HASH))


def blocks(*groups: Sequence[int | None]) -> KVCacheBlocks:
    """An allocation: block ids per KV cache group, None for vLLM's null block."""
    def block(block_id: int | None) -> KVCacheBlock:
        made = KVCacheBlock(block_id or 0)
        made.is_null = block_id is None
        return made

    return KVCacheBlocks(tuple([block(b) for b in ids] for ids in groups))


def new_request(req: Request, block_ids: Iterable[Sequence[int]], computed: int) -> NewRequestData:
    """``req`` scheduled for the first time (or, in vLLM 0.34, again after a preemption)."""
    return NewRequestData(req_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
                          mm_features=[], sampling_params=req.sampling_params,
                          pooling_params=None, block_ids=tuple(list(ids) for ids in block_ids),
                          num_computed_tokens=computed, lora_request=None)


def cached_requests(*running: tuple[str, int, Sequence[Sequence[int]] | None],
                    resumed: Iterable[str] = ()) -> CachedRequestData:
    """Requests scheduled before: (id, tokens computed, new block ids per group or None)."""
    return CachedRequestData(
        req_ids=[r for r, _, _ in running], resumed_req_ids=set(resumed),
        new_token_ids=[[] for _ in running], all_token_ids={},
        new_block_ids=[None if ids is None else tuple(list(g) for g in ids) for _, _, ids in running],
        num_computed_tokens=[c for _, c, _ in running], num_output_tokens=[0 for _ in running])


def step(new: Iterable[NewRequestData] = (), cached: CachedRequestData | None = None,
         scheduled: dict[str, int] | None = None,
         handed: dict[str, list[tuple[int, int, int]]] | None = None) -> SchedulerOutput:
    """One step's ``SchedulerOutput``; ``scheduled``: tokens per request this step; ``handed``:
    the boundary states vLLM's Mamba managers handed over, ``{req_id: [(group, block id,
    tokens)]}`` (as ``KVCacheManager.take_boundary_state_offloads`` returns them)."""
    scheduled = scheduled or {}
    block_state = None
    if handed is not None:
        block_state = KVConnectorBlockState(req_ids=set(scheduled) | set(handed),
                                            resolve_block_ids=lambda _: (),
                                            boundary_state_offloads=handed)
    return SchedulerOutput(
        scheduled_new_reqs=list(new), scheduled_cached_reqs=cached or CachedRequestData.make_empty(),
        num_scheduled_tokens=scheduled, total_num_scheduled_tokens=sum(scheduled.values()),
        scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={}, finished_req_ids=set(),
        free_encoder_mm_hashes=[], kv_connector_block_state=block_state)


def engine_configs(specs: Sequence[Any], tp_size: int = 1, kv_cache_layout: str | None = None,
                   layer_names: Sequence[str] | None = None) -> tuple[Any, Any]:
    """The parts of a ``VllmConfig`` and a ``KVCacheConfig`` that an engine's namespace reads:
    model ``org/M`` (bf16, a hub commit), one KV cache group per spec (of ``layer_names``,
    default one layer each)."""
    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(model="org/M", revision=None, dtype=torch.bfloat16,
                                     quantization=None, hf_overrides={},
                                     hf_config=SimpleNamespace(_commit_hash="abc")),
        cache_config=SimpleNamespace(cache_dtype="auto", prefix_caching_hash_algo="sha256",
                                     kv_cache_layout=None),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp_size, pipeline_parallel_size=1))
    kv_cache_config = SimpleNamespace(
        kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec, layer_names=list(layer_names or [f"l{g}"]))
                         for g, spec in enumerate(specs)],
        kv_cache_layout=kv_cache_layout)
    return vllm_config, kv_cache_config


def as_of_0_34(output: SchedulerOutput) -> SchedulerOutput:
    """``output`` as vLLM 0.34 sends it: ``CachedRequestData`` has no ``resumed_req_ids`` nor
    ``all_token_ids`` (reading them raises AttributeError, as on 0.34)."""
    cached = output.scheduled_cached_reqs
    assert not cached.resumed_req_ids, "0.34 sends resumed requests as new ones"
    del cached.resumed_req_ids, cached.all_token_ids
    return output
