"""Tiny random-weight hybrid-attention models that vLLM's CPU build serves (for the hybrid tests).

Like ``frontend/synthetic_model.py`` (same byte-level tokenizer), but with
layers of several attention kinds, so that vLLM's hybrid KV cache manager
gives them several KV cache groups:

- ``gemma3``: Gemma-3 text, four sliding-window layers (window 256) and two
  full-attention layers: three groups (sliding, sliding, full).
- ``alternating``: gpt-oss's pattern (sliding and full layers alternating,
  window 128) on a Llama body (vLLM's Llama reads ``layer_types``): two groups.
- ``llama4``: Llama-4 text, chunked local attention (chunks of 256 tokens) in
  three layers of four, full attention (no RoPE) in the fourth; small MoE
  (vLLM: four groups of one layer).
- ``qwen3_next``: Qwen3-Next, Gated DeltaNet (linear attention) and full-attention
  layers alternating, small MoE; vLLM's CPU build runs it in bf16 only and gives it
  two KV cache groups (a Mamba group of linear-attention states, a full one).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
from cachedir import wait_for_count

from lmcache_fs.storage.layout import is_temporary

MARKER = "lmcache_fs_hybrid.json"
GEMMA3_WINDOW = 256
ALTERNATING_WINDOW = 128
LLAMA4_ATTENTION_CHUNK = 384  # not a multiple of the 256-token chunk: hits load its blocks


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


def _alternating(vocab_size: int, bos: int, eos: int):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=32768, bos_token_id=bos, eos_token_id=eos,
        tie_word_embeddings=False, torch_dtype="bfloat16")
    config.sliding_window = ALTERNATING_WINDOW
    config.layer_types = ["sliding_attention", "full_attention"] * 2
    return transformers.LlamaForCausalLM(config)


def _llama4(vocab_size: int, bos: int, eos: int):
    import transformers

    config = transformers.Llama4TextConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512,
        intermediate_size_mlp=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, num_local_experts=2, num_experts_per_tok=1,
        interleave_moe_layer_step=2, attention_chunk_size=LLAMA4_ATTENTION_CHUNK,
        no_rope_layers=[1, 1, 1, 0], max_position_embeddings=32768, bos_token_id=bos,
        eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False, torch_dtype="bfloat16")
    return transformers.Llama4ForCausalLM(config)


def _qwen3_next(vocab_size: int, bos: int, eos: int):
    import transformers

    config = transformers.Qwen3NextConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        layer_types=["linear_attention", "full_attention"] * 2, linear_conv_kernel_dim=4,
        linear_key_head_dim=64, linear_value_head_dim=64, linear_num_key_heads=2,
        linear_num_value_heads=4, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=256, shared_expert_intermediate_size=256,
        max_position_embeddings=32768, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        tie_word_embeddings=False, dtype="bfloat16")
    return transformers.AutoModelForCausalLM.from_config(config)


BUILDERS = {"gemma3": _gemma3, "alternating": _alternating, "llama4": _llama4,
            "qwen3_next": _qwen3_next}


def build_hybrid_model(path: Path, family: str, tokenizer_source: Path, seed: int = 0) -> Path:
    """Write the model folder of ``family`` at ``path`` unless an identical one is there.

    ``tokenizer_source``: a folder of ``frontend/synthetic_model.py`` (its byte-level tokenizer).
    """
    import torch

    folder = Path(path)
    marker = folder / MARKER
    wanted = {"family": family, "seed": seed,
              "windows": [GEMMA3_WINDOW, ALTERNATING_WINDOW, LLAMA4_ATTENTION_CHUNK]}
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


# -- helpers of the hybrid engine tests --

LOGPROB_TOLERANCE = 1e-3  # float32: the same KV gives the same logprobs up to summation order


def generate_with_logprobs(engine: Any, prompt: list[int]) -> dict:
    return engine.command("generate", prompts=[prompt], max_tokens=8, logprobs=True)["outputs"][0]


def assert_same_output(got: dict, want: dict) -> None:
    assert got["token_ids"] == want["token_ids"]
    assert got["logprobs"] == pytest.approx(want["logprobs"], abs=LOGPROB_TOLERANCE)


def files_by_group(storage: Path) -> dict[Path, int]:
    """Published chunk files -> their KV cache group (from the namespace's manifest)."""
    found = {}
    for manifest in storage.glob("*/namespace.json"):
        group = int(json.loads(manifest.read_text()).get("kv_group", -1))
        for path in manifest.parent.glob("??/*.safetensors"):
            if not is_temporary(path.name):
                found[path] = group
    return found


def wait_for_files(storage: Path, count: int) -> dict[Path, int]:
    return wait_for_count(lambda: files_by_group(storage), count)


def by_chunk(files: dict[Path, int]) -> dict[tuple[int, int], Path]:
    """Chunk files (from :func:`files_by_group`) by (KV cache group, chunk index in the prompt)."""
    from lmcache_fs.ops.inspection import read_header

    return {(group, int(read_header(path).metadata["chunk_index"])): path
            for path, group in files.items()}


def kv_capacity(engine: Any) -> int:
    match = re.search(r"KV cache size: ([\d,]+) tokens", engine.log_text())
    assert match, "vLLM's KV cache size line is missing from the log"
    return int(match.group(1).replace(",", ""))


def store_then_load(model: Path, tmp_path_factory: Any, prompt: list[int],
                    groups: int) -> Iterator[dict[str, Any]]:
    """Engines ``plain``, ``a`` (stores ``prompt``) and ``b`` (started after A's files exist).

    Yields them with ``prompt``, A's output (``stored``) and A's files (``files``).
    """
    from engines import EngineProcess

    storage = tmp_path_factory.mktemp("hybrid-kv")
    logs = tmp_path_factory.mktemp("hybrid-logs")
    connector = {"kv_connector": "LMCacheFSConnector", "kv_role": "kv_both",
                 "kv_connector_extra_config": {"storage_path": str(storage)}}
    started: list[Any] = []
    try:
        started.append(EngineProcess(model, logs / "plain.log"))
        started.append(EngineProcess(model, logs / "a.log", connector))
        stored = generate_with_logprobs(started[1], prompt)
        files = wait_for_files(storage, groups * (len(prompt) // 256))
        started.append(EngineProcess(model, logs / "b.log", connector))
        yield {"plain": started[0], "a": started[1], "b": started[2], "prompt": prompt,
               "stored": stored, "files": files}
    finally:
        for engine in started:
            engine.close()
