"""Tiny random-weight hybrid-attention models that vLLM's CPU build serves (for the hybrid tests).

Like ``frontend/synthetic_model.py`` (same byte-level tokenizer), but with
layers of several attention kinds, so that vLLM's hybrid KV cache manager
gives them several KV cache groups:

- ``gemma3``: Gemma-3 text, four sliding-window layers (window 256) and two
  full-attention layers: three groups (sliding, sliding, full).
"""

from __future__ import annotations

import json
from pathlib import Path

MARKER = "lmcache_fs_hybrid.json"
GEMMA3_WINDOW = 256


def _gemma3(vocab_size: int, bos: int, eos: int):
    import transformers

    config = transformers.Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
        sliding_window=GEMMA3_WINDOW,
        layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2
        + ["full_attention"],
        max_position_embeddings=32768, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        tie_word_embeddings=True, torch_dtype="bfloat16")
    return transformers.Gemma3ForCausalLM(config)


BUILDERS = {"gemma3": _gemma3}


def build_hybrid_model(path: Path, family: str, tokenizer_source: Path, seed: int = 0) -> Path:
    """Write the model folder of ``family`` at ``path`` unless an identical one is there.

    ``tokenizer_source``: a folder of ``frontend/synthetic_model.py`` (its byte-level tokenizer).
    """
    import torch

    folder = Path(path)
    marker = folder / MARKER
    wanted = {"family": family, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return folder
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    model = BUILDERS[family](len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    marker.write_text(json.dumps(wanted))
    return folder
