"""Speculative decoding beside lmcache-fs, on a real chat model (vLLM's CPU build runs n-gram drafts).

Since vLLM 0.33 the model runner of an engine with a speculative decoder collects
the connector's transfer results and stats before ``wait_for_save``; 0.32 (this
build) keeps the old order, so this checks what every release shares: with an
n-gram drafter, which keeps no KV of its own, a prompt stored by the engine and
loaded back from its chunk files gives plain vLLM's tokens. Drafters that keep
a KV cache (EAGLE, MTP, draft models) are refused at start-up
(test_vllm_releases.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cachedir import wait_for_count
from demo_config import sample_documents
from engines import EngineProcess

from lmcache_fs.storage.layout import is_temporary

pytestmark = pytest.mark.engine

CHUNK = 256
# Drafts copied from the document (an answer quoting it is what n-gram drafting is for).
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2}
ANSWER_TOKENS = 48


def _prompt(model: Path) -> list[int]:
    from transformers import AutoTokenizer

    document = sample_documents()["Python: Format String Syntax"][:6000]
    question = "Quote the first sentence of this document exactly."
    tokenizer = AutoTokenizer.from_pretrained(model)
    return list(tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{document}\n\n{question}"}], add_generation_prompt=True,
        return_dict=True)["input_ids"])


def _chunk_files(storage: Path) -> list[Path]:
    return [p for p in storage.glob("*/??/*.safetensors") if not is_temporary(p.name)]


def test_ngram_drafts_over_a_prefix_loaded_from_chunk_files_give_plain_vllm_s_tokens(
        real_model, tmp_path, artifacts_dir):
    prompt = _prompt(real_model)
    chunks = (len(prompt) - 1) // CHUNK
    assert chunks >= 4, len(prompt)
    connector = {"kv_connector": "LMCacheFSConnector", "kv_role": "kv_both",
                 "kv_connector_extra_config": {"storage_path": str(tmp_path / "kv"),
                                               "chunk_size": CHUNK}}
    engines = []
    try:
        engines.append(plain := EngineProcess(real_model, artifacts_dir / "spec-plain.log",
                                              max_model_len=4096, speculative=NGRAM))
        engines.append(cached := EngineProcess(real_model, artifacts_dir / "spec-cached.log",
                                               connector, max_model_len=4096, speculative=NGRAM))
        (reference,) = plain.generate([prompt], ANSWER_TOKENS)
        (computed,) = cached.generate([prompt], ANSWER_TOKENS)
        wait_for_count(lambda: _chunk_files(tmp_path / "kv"), chunks)
        cached.reset_prefix_cache()  # only the chunk files can give a hit now
        (loaded,) = cached.generate([prompt], ANSWER_TOKENS)
        assert computed["num_cached_tokens"] == 0
        assert loaded["num_cached_tokens"] >= chunks * CHUNK - 128  # (block-aligned below the end)
        assert loaded["token_ids"] == computed["token_ids"] == reference["token_ids"]
        assert len(set(reference["token_ids"])) > 8  # a real answer, not one repeated token
        log = cached.log_text()
        assert "on vLLM 0.32.0 (tested with vLLM 0.32.0 to 0.34.0)" in log
        assert "Speculative" in log or "speculative" in log
    finally:
        for engine in engines:
            engine.close()
