"""Build a small random-weight Llama model folder that vLLM can serve offline.

Tests and the CPU demo cannot download models, so they serve this instead: a
Llama-architecture model with random weights and a byte-level tokenizer. Its
answers are meaningless, but greedy decoding is deterministic (so "same tokens
with and without the cache" is a real check) and prefill time is real.

Example:
    >>> from synthetic_model import build_synthetic_model
    >>> path = build_synthetic_model("/tmp/tiny-llama")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

MARKER = "lmcache_fs_synthetic.json"


@dataclass(frozen=True)
class SyntheticModelSpec:
    """Geometry of the synthetic model (defaults: about 13M parameters)."""

    hidden_size: int = 256
    intermediate_size: int = 1024
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 32768
    seed: int = 0


def build_synthetic_model(path: str | os.PathLike[str],
                          spec: SyntheticModelSpec = SyntheticModelSpec()) -> Path:
    """Write the model folder at ``path`` unless an identical one is already there.

    Args:
        path: target folder (created).
        spec: model geometry; part of the marker so a changed spec rebuilds.

    Returns:
        The folder, ready for ``vllm serve`` or ``LLM(model=...)``.
    """
    folder = Path(path)
    marker = folder / MARKER
    wanted = asdict(spec)
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return folder

    # Heavy imports stay here: the package itself must import without them.
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    byte_vocab = {tok: i for i, tok in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    specials = ["<s>", "</s>", "<unk>"]
    for tok in specials:
        byte_vocab[tok] = len(byte_vocab)
    tokenizer = Tokenizer(models.BPE(vocab=byte_vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")
    fast.save_pretrained(folder)

    config = LlamaConfig(
        vocab_size=len(byte_vocab),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=byte_vocab["<s>"],
        eos_token_id=byte_vocab["</s>"],
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    marker.write_text(json.dumps(wanted))
    return folder


if __name__ == "__main__":
    import sys

    print(build_synthetic_model(sys.argv[1] if len(sys.argv) > 1 else ".cache/tiny-llama"))
