"""The namespace fields of a vLLM engine: everything that makes KV bytes incompatible."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lmcache_fs.model_identity import model_identity, weights_fingerprint
from lmcache_fs.storage.layout import FieldValue, Namespace, seed_marker_name, seed_of_marker

from .mamba_state import is_state_spec, state_fields

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheSpec

logger = logging.getLogger(__name__)


def _settings_hash(value: object) -> str:
    """A short, stable hash of a settings object (a dict, or the name of a function)."""
    if not value:
        return ""
    text = json.dumps(value, sort_keys=True, default=lambda v: getattr(v, "__qualname__", repr(v)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def kv_layout_name(vllm_config: "VllmConfig", head_size: int, block_size: int) -> str:
    """How block bytes are laid out.

    On CPU the attention kernels pack K and V per instruction set, so the ISA
    is part of the layout. On CUDA chunks hold blocks in vLLM's logical
    [heads, tokens, 2*head_size] order whatever the physical stride order
    (NHD or HND), so engines with different attention backends can share them
    (where vLLM's kernel blocks change a chunk's shape, ``page_shape`` says so).
    """
    from vllm.platforms import current_platform

    if current_platform.device_type == "cpu":
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        isa = _get_attn_isa(vllm_config.model_config.dtype, block_size, head_size,
                            vllm_config.cache_config.cache_dtype)
        return f"cpu-{isa}"
    return f"{current_platform.device_type}-logical"


def layer_specs(spec: "KVCacheSpec") -> list["KVCacheSpec"]:
    """The specs of a group's layers: one per layer where vLLM groups layers of one type whose
    specs differ (``UniformTypeKVCacheSpecs``), else the group's spec alone."""
    inner = getattr(spec, "kv_cache_specs", None)
    return list(inner.values()) if inner else [spec]


def is_plain_full_attention(kv_cache_config: "KVCacheConfig") -> bool:
    """One KV cache group of full attention: the layout lmcache-fs had before hybrid models."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    groups = kv_cache_config.kv_cache_groups
    return len(groups) == 1 and all(type(one) in (FullAttentionSpec, MLAAttentionSpec)
                                    for one in layer_specs(groups[0].kv_cache_spec))


def _kernel_block_size(spec: "KVCacheSpec") -> int:
    """The kernel block size vLLM's workers split this spec's blocks into (the block size: none).

    The workers pick it from the attention backends (``prepare_kernel_block_sizes``);
    a backend with fixed kernel block sizes leaves the largest in the spec as
    ``block_stride_alignment=MultipleOf(n)``, from which vLLM derives the split
    as ``gcd(n, block_size)`` (``KVCacheSpec.get_block_stride_alignment``), as here.
    """
    from vllm.v1.attention.backend import MultipleOf

    alignment = getattr(spec, "block_stride_alignment", None)
    if not isinstance(alignment, MultipleOf):
        return int(spec.block_size)
    return math.gcd(alignment.base, int(spec.block_size))


def split_page_field(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig",
                     spec: "KVCacheSpec") -> dict[str, FieldValue]:
    """``{"page_shape": "HxRxW"}`` where vLLM's kernel blocks change the page of a chunk, else ``{}``.

    Chunks hold whole blocks, ``[heads, block_size, C]`` per page, also where
    vLLM splits blocks into kernel blocks under the NHD layout (the same bytes:
    those engines share files with unsplit ones, and namespaces that existed
    before this field keep their names). Under HND a whole block is viewed as
    ``[heads, ratio, kernel_block_size * C]`` (see
    :mod:`lmcache_fs.transfer.kernel_blocks`): same bytes, another shape, so a
    namespace of its own. The worker checks its views against this at start-up.
    """
    from vllm.config.cache import _layout_from_name
    from vllm.v1.kv_cache_interface import AttentionSpec, compute_layer_kv_cache_shape_bytes
    from vllm.v1.kv_cache_layout import KVCacheLayout

    spec = layer_specs(spec)[0]
    layout = (getattr(kv_cache_config, "kv_cache_layout", None)
              or getattr(vllm_config.cache_config, "kv_cache_layout", None))
    kernel = _kernel_block_size(spec)
    if (not isinstance(spec, AttentionSpec) or kernel == spec.block_size or layout is None
            or _layout_from_name(layout) != KVCacheLayout.LBHNC):
        return {}
    _, heads, tokens, content_bytes = compute_layer_kv_cache_shape_bytes(spec, 1)
    if heads == 1:  # one head: the kernel blocks' tokens follow each other as under NHD
        return {}
    content = content_bytes // spec.dtype.itemsize
    return {"page_shape": f"{heads}x{tokens // kernel}x{kernel * content}"}


def _attention_fields(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig",
                      spec: "KVCacheSpec") -> dict[str, FieldValue]:
    """The geometry of an attention group's blocks (the fields every namespace had before
    linear-attention states: their names must not change)."""
    return {
        "num_kv_heads": int(spec.num_kv_heads),
        "head_size": int(spec.head_size),
        "kv_dtype": str(spec.dtype).removeprefix("torch."),
        "block_size": int(spec.block_size),
        "kv_layout": kv_layout_name(vllm_config, int(spec.head_size), int(spec.block_size)),
        **split_page_field(vllm_config, kv_cache_config, spec),
    }


def namespace_fields(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig",
                     chunk_size: int, group_index: int = 0) -> dict[str, FieldValue]:
    """The rank-independent fields of the namespace of KV cache group ``group_index``.

    An engine of one full-attention group keeps the fields it always had (its
    files stay valid). Any other engine gets one namespace per group: the
    group's own geometry (a linear-attention group's state shapes, dtypes and
    layout, see ``connector/mamba_state.py``), its index, and every group's spec
    (``kv_groups``), so that engines whose groups differ in any way never read
    each other's files.
    """
    group = kv_cache_config.kv_cache_groups[group_index]
    spec = group.kv_cache_spec
    hybrid: dict[str, FieldValue] = {}
    if not is_plain_full_attention(kv_cache_config):
        from .groups import describe_groups

        groups = kv_cache_config.kv_cache_groups
        hybrid = {"kv_group": group_index,
                  "kv_groups": describe_groups([g.kv_cache_spec for g in groups],
                                               [len(g.layer_names) for g in groups], chunk_size)}
    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    # The commit the hub resolved: a hub id, or a branch or tag given as --revision, moves.
    revision = getattr(model_config.hf_config, "_commit_hash", None) or model_config.revision
    geometry = (state_fields(spec) if is_state_spec(spec)
                else _attention_fields(vllm_config, kv_cache_config, spec))
    return {
        "model": model_identity(model_config.model, model_config.revision),
        "model_revision": str(revision or ""),
        "weights": weights_fingerprint(model_config.model),
        "quantization": str(model_config.quantization or ""),
        "hf_overrides": _settings_hash(model_config.hf_overrides),
        "num_layers": len(group.layer_names),
        "dtype": str(model_config.dtype).removeprefix("torch."),
        "kv_cache_dtype": str(vllm_config.cache_config.cache_dtype),
        **geometry,
        "tp_size": int(parallel.tensor_parallel_size),
        "pp_size": int(parallel.pipeline_parallel_size),
        "hash_algo": str(vllm_config.cache_config.prefix_caching_hash_algo),
        "chunk_size": int(chunk_size),
        **hybrid,
    }


def rank_namespace(fields: dict[str, FieldValue], tp_rank: int, pp_rank: int) -> Namespace:
    """The namespace of one rank's files (each rank writes its own shard)."""
    return Namespace({**fields, "tp_rank": tp_rank, "pp_rank": pp_rank})


def hash_seed_fingerprint(hash_algo: str) -> str | None:
    """A short fingerprint of the seed vLLM will derive its block hashes from.

    Computed the way vLLM's EngineCore does (it seeds after building the
    scheduler, so this is known at start-up). None when the seed is random per
    process (a non-cryptographic hash without PYTHONHASHSEED): then no two
    instances can ever share chunks.
    """
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils

    hash_fn = get_hash_fn_by_name(hash_algo)
    # vLLM's non-cryptographic hashes (xxhash, xxhash_cbor) take a random seed per process
    # unless PYTHONHASHSEED is set; sha256 and sha256_cbor take a fixed default.
    if os.environ.get("PYTHONHASHSEED") is None and hash_algo.startswith("xxhash"):
        return None
    seed = kv_cache_utils.resolve_none_hash_seed(hash_fn)
    return hashlib.sha256(bytes(hash_fn(seed))).hexdigest()[:12]


def check_hash_seed(directory: Path, hash_algo: str) -> None:
    """Record this engine's prefix-hash seed; warn if other instances use another.

    vLLM's block hashes start from a seed (PYTHONHASHSEED, or a fixed default
    for sha256). Instances with different seeds compute different keys for the
    same tokens and silently never share chunks (LMCache #1788): say so at
    start-up, with the fix.
    """
    fingerprint = hash_seed_fingerprint(hash_algo)
    if fingerprint is None:
        logger.warning(
            "prefix_caching_hash_algo=%s without PYTHONHASHSEED gives every process a random "
            "hash seed: this engine can never share chunks with another. Set PYTHONHASHSEED to "
            "one value on every instance, or use the default sha256.", hash_algo)
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _leave_marker(directory / seed_marker_name(fingerprint))
        # Only names of our own shape are compared and logged: anyone may create files here.
        others = sorted({seed for seed in map(seed_of_marker, os.listdir(directory))
                         if seed is not None and seed != fingerprint})
    except OSError:  # a read-only replica cannot leave its marker: nothing to compare
        return
    if others:
        logger.warning(
            "other instances on %s hash prompts with a different seed (%s, this one %s): they "
            "will never share chunks with this engine. Set PYTHONHASHSEED to one value on every "
            "instance (or unset it everywhere), then restart them. PYTHONHASHSEED here is %s.",
            directory, ", ".join(others), fingerprint,
            "set" if os.environ.get("PYTHONHASHSEED") is not None else "unset")


def _leave_marker(marker: Path) -> None:
    """Create the empty file ``marker`` if no entry has its name, never following a symlink.

    ``O_CREAT | O_EXCL | O_NOFOLLOW``: a symlink planted at the name stays a
    dangling or foreign link, and nothing outside the cache is created or touched.
    """
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
    except FileExistsError:
        pass  # ours from an earlier start, another instance's with the same seed, or planted
