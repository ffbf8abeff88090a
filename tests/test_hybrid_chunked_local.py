"""Chunked local attention on real vLLM CPU engines: a tiny Llama-4 text model.

Three layers of chunked local attention (attention chunks of 384 tokens) and
one full-attention layer (tests/hybrid_models.py); vLLM gives it four KV cache
groups of one layer. A hit at 1024 tokens needs the chunked groups' blocks
from 768 on (the attention chunk the next token is in) and the whole prefix of
the full group; files of chunked groups hold whole chunks.
"""

from __future__ import annotations

import random

import pytest
from hybrid_models import (
    assert_same_output,
    build_hybrid_model,
    generate_with_logprobs,
    kv_capacity,
    store_then_load,
)

pytestmark = pytest.mark.engine

PROMPT_LEN = 1100  # four chunks of 256 and a tail
FULL_HIT = 1024


@pytest.fixture(scope="module")
def setup(synthetic_model, tmp_path_factory):
    model = build_hybrid_model(synthetic_model.parent / "hybrid-llama4", "llama4", synthetic_model)
    rng = random.Random(384)
    yield from store_then_load(model, tmp_path_factory,
                               [rng.randrange(3, 250) for _ in range(PROMPT_LEN)], groups=4)


def test_capacity_is_plain_vllms(setup):
    assert kv_capacity(setup["a"]) == kv_capacity(setup["plain"])


def test_fresh_engine_loads_with_plain_vllms_tokens_and_logprobs(setup):
    got = generate_with_logprobs(setup["b"], setup["prompt"])
    assert got["num_cached_tokens"] == FULL_HIT
    want = generate_with_logprobs(setup["plain"], setup["prompt"])
    assert_same_output(got, want)
    assert_same_output(setup["stored"], want)
