"""Linear-attention (Gated DeltaNet) state groups: what lmcache-fs stores of them, and from where.

Qwen3-Next and Qwen3.5 interleave Gated DeltaNet layers with full-attention
layers. vLLM keeps the linear-attention layers' state (a conv state and a
recurrent state per request, per layer) in a KV cache group of its own,
described by ``MambaSpec``. With ``mamba_cache_mode="align"`` a state is kept
only where a step ends on a block boundary: the block at index ``i`` of the
group holds the state after exactly ``(i + 1) * block_size`` tokens, and every
other entry of the request's block table is vLLM's null block. That table is
not append-only: vLLM frees and nulls interior states as the request goes on,
and with speculative decoding moves blocks in place. So lmcache-fs never reads
a state by its position in the table. The scheduler hands over the exact block
of every boundary state it caches (``SchedulerOutput.kv_connector_block_state.
boundary_state_offloads``, filled by vLLM's ``MambaManager.cache_blocks``), in
the step whose forward pass computes it; lmcache-fs copies it in that step's
save, before any later step can reuse the block, as it copies attention blocks.

A state group's file of a chunk holds the state at the chunk's end: one block
(``[layers, 1, 1, 1, state_bytes]``, vLLM's int8 page views, each layer's
states packed as vLLM packs them), stored only where vLLM handed that state
over. A hit of ``h`` tokens needs that one state (``GroupGeometry`` kind
``state``: vLLM skips ``h - 1`` tokens, as ``MambaManager.get_num_skipped_tokens``),
so hits land only on chunk boundaries whose state file is there; vLLM allocates
one real block for it, at index ``h / block_size - 1``, and the load goes there.

Only Gated DeltaNet groups are served: they are what vLLM's CPU build runs
here with prefix caching (a tiny Qwen3-Next). Mamba1/Mamba2 hybrids (Jamba,
Bamba, Granite 4, Nemotron-H, Falcon-H1) keep the same kind of group, but vLLM's
CPU build crashes on them with prefix caching on, so no such engine was ever
checked against lmcache-fs: they are refused, like every engine it could not
check. So are other cache modes (no exact state at block boundaries) and
speculative decoding (speculative state blocks move in place; untested).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.v1.kv_cache_interface import MambaSpec

from lmcache_fs.config import ConfigError
from lmcache_fs.storage.layout import FieldValue

from .vllm_compat import state_alignment

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput

# vLLM's names (``MambaAttentionBackendEnum``) of the state kinds lmcache-fs stores.
SERVED_STATE_TYPES = ("GDN_ATTN",)

HandedStates = dict[tuple[int, int], int]
"""One request's boundary states of a step: (KV cache group, tokens before it) -> block id."""


def is_state_spec(spec: Any) -> bool:
    """Whether a KV cache spec keeps a recurrent state per block rather than per-token KV."""
    return isinstance(spec, MambaSpec)


def check_state_group(spec: MambaSpec, layer_name: str, num_layers: int,
                      speculative: Any) -> None:
    """Refuse a state group whose states lmcache-fs could not store and load exactly.

    Raises:
        ConfigError: naming the reason and the fix.
    """
    where = f"layer {layer_name} ({num_layers} layers of this kind)"
    if spec.mamba_type.name not in SERVED_STATE_TYPES:
        raise ConfigError(
            f"lmcache-fs cannot store the state of {where}: it is a {spec.mamba_type.name} "
            f"state, and lmcache-fs stores only Gated DeltaNet ({', '.join(SERVED_STATE_TYPES)}) "
            "states of linear-attention hybrids (Qwen3-Next, Qwen3.5); Mamba hybrids are "
            "untested (vLLM's CPU build cannot run them with prefix caching): remove the "
            "kv-transfer-config")
    if spec.mamba_cache_mode != "align":
        raise ConfigError(
            f"lmcache-fs needs mamba_cache_mode 'align' for the state of {where}, this engine "
            f"has {spec.mamba_cache_mode!r}: only then does vLLM keep each state exactly at a "
            "block boundary. Start vLLM with --enable-prefix-caching --mamba-cache-mode align, "
            "or remove the kv-transfer-config")
    if speculative is not None:
        raise ConfigError(
            f"lmcache-fs does not support speculative decoding (method "
            f"{getattr(speculative, 'method', None)!r}) with linear-attention layers ({where}): "
            "vLLM moves their speculative state blocks in place, which lmcache-fs was not "
            "tested against. Remove the speculative config, or the kv-transfer-config")


def state_fields(spec: MambaSpec) -> dict[str, FieldValue]:
    """The namespace fields that make a state group's bytes incompatible (its geometry).

    The state shapes and dtypes (vLLM's CPU build keeps the recurrent state in
    float32 whatever the model's dtype), the conv state's layout (``SD`` or
    ``DS``: the same shape can hold either order), the alignment of states in a
    page (vLLM 0.34), the kind of state, the device kind that wrote it (kernels
    of another platform may order a state otherwise), and the block size.
    """
    from vllm.model_executor.layers.mamba.mamba_utils import get_conv_state_layout
    from vllm.platforms import current_platform

    return {
        "state_type": spec.mamba_type.name,
        "state_shapes": ",".join("x".join(map(str, shape)) for shape in spec.shapes),
        "state_dtypes": ",".join(str(d).removeprefix("torch.") for d in spec.dtypes),
        "state_alignment": state_alignment(spec),
        "conv_state_layout": str(get_conv_state_layout()),
        "state_platform": str(current_platform.device_type),
        "block_size": int(spec.block_size),
    }


def describe_state_group(spec: MambaSpec, layers: int) -> dict[str, FieldValue]:
    """A state group's entry in the ``kv_groups`` field that every group's namespace carries."""
    return {"type": type(spec).__name__, "layers": layers, "held_blocks": 1,
            **state_fields(spec)}


def handed_states(scheduler_output: "SchedulerOutput") -> dict[str, HandedStates]:
    """The boundary states vLLM handed over this step, per request.

    Each holds the state after exactly that many tokens once this step's
    forward pass has run, and keeps it until a later step: the worker copies
    it in this step's save.
    """
    block_state = scheduler_output.kv_connector_block_state
    if block_state is None:
        return {}
    # vLLM's null block (id 0) holds no state: its OffloadingConnector skips it too.
    return {req_id: {(group, boundary): block for group, block, boundary in entries if block}
            for req_id, entries in block_state.boundary_state_offloads.items()}
