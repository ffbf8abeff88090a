"""Two more hybrid families on real vLLM CPU engines, one Llama body each (tests/hybrid_models.py).

- ``alternating``: gpt-oss's pattern, sliding (window 128) and full-attention layers
  alternating; vLLM gives it two KV cache groups. With the default chunk of 256 tokens and
  vLLM CPU's 128-token blocks, a sliding group's file holds one block of the chunk's two, the
  only one inside the window at the chunk's end.
- ``llama4``: a tiny Llama-4 text model, three layers of chunked local attention (attention
  chunks of 384 tokens) and one full-attention layer; vLLM gives it four KV cache groups of
  one layer. A hit at 1024 tokens needs the chunked groups' blocks from 768 on (the
  attention chunk the next token is in) and the whole prefix of the full group; files of
  chunked groups hold whole chunks.

Engines per family: ``plain`` (reference), ``a`` (stores), ``b`` (fresh, loads).
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
# Per family: the prompt's seed, and the blocks (of 128 tokens) each KV cache group's files
# hold: alternating's sliding group one (inside the window at a chunk's end), its full
# group two; llama4's chunked-local groups whole chunks, like its full group.
FAMILIES = {"alternating": (128, [[1], [2]]), "llama4": (384, [[2], [2], [2], [2]])}


@pytest.fixture(scope="module", params=list(FAMILIES))
def setup(request, synthetic_model, tmp_path_factory):
    family = request.param
    seed, blocks = FAMILIES[family]
    model = build_hybrid_model(synthetic_model.parent / f"hybrid-{family}", family,
                               synthetic_model)
    rng = random.Random(seed)
    for engines in store_then_load(model, tmp_path_factory,
                                   [rng.randrange(3, 250) for _ in range(PROMPT_LEN)],
                                   groups=len(blocks)):
        yield {**engines, "blocks": blocks}


def test_capacity_is_plain_vllms(setup):
    assert kv_capacity(setup["a"]) == kv_capacity(setup["plain"])


def test_fresh_engine_loads_with_plain_vllms_tokens_and_logprobs(setup):
    got = generate_with_logprobs(setup["b"], setup["prompt"])
    assert got["num_cached_tokens"] == FULL_HIT
    want = generate_with_logprobs(setup["plain"], setup["prompt"])
    assert_same_output(got, want)
    assert_same_output(setup["stored"], want)


def test_each_groups_files_hold_the_blocks_a_hit_needs(setup):
    blocks = {}
    for path, group in setup["files"].items():
        blocks.setdefault(group, set()).add(read_header(path).shape[1])
    assert sorted(map(sorted, blocks.values())) == setup["blocks"]
