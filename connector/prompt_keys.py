"""The chunk keys an engine gives a prompt, computed offline (for ``lmcache-fs pin --prompt``).

A chunk's key is vLLM's chained block hash of the chunk's last block, so the
keys of a prompt can only be computed with vLLM's own hash functions. So this
module lives in the adapter (``connector/``, the only code that imports vLLM)
and imports vLLM lazily, inside functions: ``lmcache-fs pin --prompt`` reaches
up to it from ``lmcache_fs.ops.cli``, the one import that points up the layers
(``tests/test_layers.py``). It covers plain text prompts (no LoRA, multimodal
input or cache salt, which vLLM mixes into the hashes).

The seed of vLLM's hashes comes from ``PYTHONHASHSEED`` (or a fixed default
for sha256): run the CLI with the same setting as the engines.
"""

from __future__ import annotations

import os
from typing import Sequence


def tokenize(model: str, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text`` with the model folder's tokenizer, as vLLM's completions API makes them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def chunk_keys(token_ids: Sequence[int], chunk_size: int, block_size: int,
               hash_algo: str = "sha256") -> list[str]:
    """Keys of the full chunks of a prompt: the hash of each chunk's last block, hex.

    Raises:
        ValueError: ``chunk_size`` is not a multiple of ``block_size``, an
            unknown ``hash_algo``, or a randomly seeded one (xxhash without
            PYTHONHASHSEED), whose keys no other process can reproduce.
    """
    if chunk_size % block_size:
        raise ValueError(f"chunk_size {chunk_size} is not a multiple of block_size {block_size}")
    if hash_algo.startswith("xxhash") and os.environ.get("PYTHONHASHSEED") is None:
        raise ValueError(f"hash algorithm {hash_algo} is seeded at random unless PYTHONHASHSEED "
                         "is set: set it to the engines' value")
    # vLLM only after the checks above: importing it takes seconds.
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils

    hash_fn = get_hash_fn_by_name(hash_algo)
    kv_cache_utils.init_none_hash(hash_fn)
    blocks_per_chunk = chunk_size // block_size
    keys: list[str] = []
    parent = None
    for end in range(block_size, len(token_ids) + 1, block_size):
        parent = kv_cache_utils.hash_block_tokens(hash_fn, parent, token_ids[end - block_size:end])
        if (end // block_size) % blocks_per_chunk == 0:
            keys.append(bytes(parent).hex())
    return keys
