"""A second sliding-window family on real vLLM CPU engines: gpt-oss's alternating pattern.

Sliding (window 128) and full-attention layers alternate on a Llama body
(tests/hybrid_models.py): vLLM gives it two KV cache groups. With the default
chunk of 256 tokens and vLLM CPU's 128-token blocks, a sliding group's file
holds one block of the chunk's two, the only one inside the window at the
chunk's end. Engines: ``plain`` (reference), ``a`` (stores), ``b`` (fresh, loads).
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

from lmcache_fs.ops.inspection import read_header

pytestmark = pytest.mark.engine

PROMPT_LEN = 1100  # four chunks of 256 and a tail
FULL_HIT = 1024


@pytest.fixture(scope="module")
def setup(synthetic_model, tmp_path_factory):
    model = build_hybrid_model(synthetic_model.parent / "hybrid-alternating", "alternating",
                               synthetic_model)
    rng = random.Random(128)
    yield from store_then_load(model, tmp_path_factory,
                               [rng.randrange(3, 250) for _ in range(PROMPT_LEN)], groups=2)


def test_capacity_is_plain_vllms(setup):
    assert kv_capacity(setup["a"]) == kv_capacity(setup["plain"])


def test_sliding_files_hold_the_one_block_a_window_of_128_needs(setup):
    blocks = {}
    for path, group in setup["files"].items():
        blocks.setdefault(group, set()).add(read_header(path).shape[1])
    assert sorted(map(sorted, blocks.values())) == [[1], [2]]  # sliding, full


def test_fresh_engine_loads_with_plain_vllms_tokens_and_logprobs(setup):
    got = generate_with_logprobs(setup["b"], setup["prompt"])
    assert got["num_cached_tokens"] == FULL_HIT
    want = generate_with_logprobs(setup["plain"], setup["prompt"])
    assert_same_output(got, want)
    assert_same_output(setup["stored"], want)
