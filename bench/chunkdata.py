"""The chunk bytes every storage competitor writes: identical in both virtualenvs.

Needs only torch, so the LMCache worker (its own virtualenv) builds the very
same bytes from the same seed instead of receiving gigabytes over a pipe.
A chunk has the KV shape of one 256-token chunk, ``(layers, 2, 256, heads,
head_dim)`` in bfloat16: 32 layers x 8 KV heads x 128 is Llama-3-8B's 32 MiB.
"""

from __future__ import annotations

import torch

TOKENS = 256
KV_HEADS = 8
HEAD_DIM = 128
DTYPE = torch.bfloat16


def chunk_shape(layers: int, tokens: int = TOKENS) -> tuple[int, int, int, int, int]:
    """KV shape of one chunk: (layers, K and V, tokens, KV heads, head size)."""
    return (layers, 2, tokens, KV_HEADS, HEAD_DIM)


def make_chunks(shape: tuple[int, ...], count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` distinct chunks of random bytes, the same for the same arguments.

    One random chunk is drawn and copied, with the chunk number written into its
    first eight bytes: random enough that no layer can compress or deduplicate
    it, and fast (drawing 1 GiB of random numbers would take seconds).
    """
    gen = torch.Generator().manual_seed(seed)
    numel = 1
    for d in shape:
        numel *= d
    base = torch.randint(0, 256, (numel * DTYPE.itemsize,), dtype=torch.uint8, generator=gen)
    chunks = []
    for i in range(count):
        raw = base.clone()
        raw[:8] = torch.tensor(list(i.to_bytes(8, "little")), dtype=torch.uint8)
        chunks.append(raw.view(DTYPE).view(shape))
    return chunks


def nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's data."""
    return t.numel() * t.element_size()
