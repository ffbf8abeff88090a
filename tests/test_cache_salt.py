"""Tenants separated by vLLM's ``cache_salt``, end to end through the OpenAI API of a real engine.

vLLM folds a request's ``cache_salt`` (a field of the completions and chat
request body) into the hash of its first block, so every chunk key of a salted
prompt differs from the same prompt's keys under another salt or none. Through
the shared directory that means: the same prompt sent by two tenants with
different salts never loads the other's chunks; the same salt does.
Between requests the engine's own prefix cache is reset (vLLM's dev endpoint),
so every hit counted here came from a chunk file.
"""

import random
import time

import pytest
import requests
from engine_client import cache_counters
from engines import served

from lmcache_fs.ops.inventory import namespace_dirs, scan_chunks

pytestmark = pytest.mark.engine

CHUNK = 256  # lmcache-fs's default chunk_size
PROMPT = [random.Random(7).randrange(3, 250) for _ in range(2 * CHUNK + 40)]  # 2 full chunks
FULL_HIT = 2 * CHUNK


@pytest.fixture(scope="module")
def engine(synthetic_model, tmp_path_factory, artifacts_dir):
    storage = tmp_path_factory.mktemp("salted-kv")
    with served(synthetic_model, "salted", artifacts_dir / "cache-salt-engine.log",
                storage) as spec:
        yield spec, storage, synthetic_model.name


def _chunk_keys(storage):
    return {c.key for ns in namespace_dirs(storage) for c in scan_chunks(ns)}


def _ask(engine, salt):
    """One request (salted, or not); returns (tokens, tokens loaded from chunk files, new keys)."""
    spec, storage, model = engine
    before_keys, before = _chunk_keys(storage), cache_counters(spec.as_config())
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    if salt is not None:
        body["cache_salt"] = salt
    response = requests.post(f"{spec.url}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    tokens = response.json()["choices"][0]["token_ids"]
    loaded = (cache_counters(spec.as_config()) - before).shared_hit_tokens
    deadline = time.monotonic() + 60  # stores are published in the background
    while len(_chunk_keys(storage) - before_keys) < 2 and loaded == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    reset = requests.post(f"{spec.url}/reset_prefix_cache", timeout=60)
    assert reset.json()["success"]  # the next request can only hit chunk files
    return tokens, loaded, _chunk_keys(storage) - before_keys


def test_different_salts_never_share_chunks_and_the_same_salt_does(engine):
    tokens_a, loaded, keys_a = _ask(engine, "tenant-a")
    assert loaded == 0 and len(keys_a) == 2  # stored tenant a's two chunks
    _, loaded, keys_b = _ask(engine, "tenant-b")
    assert loaded == 0 and len(keys_b) == 2 and not keys_a & keys_b  # same prompt, own chunks
    _, loaded, keys_none = _ask(engine, None)
    assert loaded == 0 and len(keys_none) == 2 and not keys_none & (keys_a | keys_b)
    again_a, loaded, new = _ask(engine, "tenant-a")
    assert loaded == FULL_HIT and not new  # tenant a's own chunks, from the files
    assert again_a == tokens_a
    _, loaded, new = _ask(engine, "tenant-b")
    assert loaded == FULL_HIT and not new


def test_a_salt_vllm_refuses_is_a_clear_400_not_a_crash(engine):
    spec, _, model = engine
    response = requests.post(f"{spec.url}/v1/completions", timeout=60,
                             json={"model": model, "prompt": PROMPT[:10], "max_tokens": 1,
                                   "cache_salt": "a/b"})
    assert response.status_code == 400 and "cache_salt" in response.text
    assert requests.get(f"{spec.url}/health", timeout=10).status_code == 200
