"""The adapter against the published sources of every vLLM release it supports.

vLLM's CPU build exists only for 0.32, so the engine tests cannot run 0.33 or
0.34. This test reads each release's sources instead (downloaded once with
``pip download --no-deps``, never installed, see ``vllm_sources.py``) and checks
what ``connector/`` uses: every imported name, every attribute it reads of the
objects vLLM hands it, the connector's hooks and their signatures, the abstract
methods, each difference ``connector/vllm_compat.py`` declares, and that the
block-hash functions behind chunk keys are the same text in every release.
The releases are ``vllm_compat.TESTED_RELEASES``: one line adds the next.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from vllm_contract import (AdapterUse, Declared, adapter_use, declared_violations,
                           hook_violations, import_violations, member_violations,
                           release_function, source_of)
from vllm_sources import ReleaseSources, release_sources

from lmcache_fs.connector import vllm_compat as COMPAT

REPO = Path(__file__).resolve().parent.parent
ADAPTER = sorted((REPO / "connector").glob("*.py"))


DECLARED = [Declared(c.release, c.module.removesuffix(".py").replace("/", "."), c.owner, c.member,
                     c.added) for c in COMPAT.CHANGES]

# Classes whose instances vLLM hands the adapter, or whose attributes it reads; the
# attributes it reads of them must exist in every release, or be declared in CHANGES.
CLASSES = [
    ("vllm.v1.core.sched.output", "SchedulerOutput"),
    ("vllm.v1.core.sched.output", "NewRequestData"),
    ("vllm.v1.core.sched.output", "CachedRequestData"),
    ("vllm.v1.core.sched.output", "KVConnectorBlockState"),
    ("vllm.v1.request", "Request"),
    ("vllm.v1.core.kv_cache_manager", "KVCacheBlocks"),
    ("vllm.v1.core.kv_cache_utils", "KVCacheBlock"),
    ("vllm.v1.kv_cache_interface", "KVCacheConfig"),
    ("vllm.v1.kv_cache_interface", "KVCacheGroupSpec"),
    ("vllm.v1.kv_cache_interface", "FullAttentionSpec"),
    ("vllm.v1.kv_cache_interface", "SlidingWindowSpec"),
    ("vllm.v1.kv_cache_interface", "ChunkedLocalAttentionSpec"),
    ("vllm.v1.kv_cache_interface", "MLAAttentionSpec"),
    ("vllm.v1.kv_cache_interface", "UniformTypeKVCacheSpecs"),
    ("vllm.v1.kv_cache_interface", "MambaSpec"),
    ("vllm.v1.outputs", "KVConnectorOutput"),
    ("vllm.config.vllm", "VllmConfig"),
    ("vllm.config.kv_transfer", "KVTransferConfig"),
    ("vllm.config.parallel", "ParallelConfig"),
    ("vllm.config.cache", "CacheConfig"),
    ("vllm.config.model", "ModelConfig"),
    ("vllm.config.speculative", "SpeculativeConfig"),
    ("vllm.distributed.parallel_state", "GroupCoordinator"),
    ("vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorBase_V1"),
    ("vllm.distributed.kv_transfer.kv_connector.v1.metrics", "KVConnectorStats"),
    ("vllm.distributed.kv_transfer.kv_connector.v1.metrics", "KVConnectorPromMetrics"),
]

# The functions that turn tokens into block hashes, and so into chunk keys: a change in
# any of them would give every chunk written by another release a different key. Each is
# the same text in every release, except the per-request hasher (0.33 added an optional
# lookahead, off by default; 0.34 slices the tokens through a helper), which is run instead.
HASH_FUNCTIONS = {
    "vllm.utils.hashing": ("sha256", "sha256_cbor", "_xxhash_digest", "xxhash", "xxhash_cbor",
                           "get_hash_fn_by_name"),
    "vllm.v1.core.kv_cache_utils": ("DEFAULT_NONE_HASH_SEED", "resolve_none_hash_seed",
                                    "get_none_hash_seed", "init_none_hash", "hash_block_tokens",
                                    "generate_block_hash_extra_keys", "_gen_mm_extra_hash_keys",
                                    "_gen_lora_extra_hash_keys",
                                    "_gen_prompt_embeds_extra_hash_keys"),
}


@pytest.fixture(scope="module")
def releases() -> list[ReleaseSources]:
    return [ReleaseSources(v, release_sources(v)) for v in COMPAT.TESTED_RELEASES]


@pytest.fixture(scope="module")
def use() -> AdapterUse:
    found = adapter_use(ADAPTER, "LMCacheFSConnector")
    assert found.methods and found.imports, "the adapter's source was not found"
    return found


@pytest.mark.parametrize("version", COMPAT.TESTED_RELEASES)
def test_every_name_the_adapter_imports_exists(use, releases, version):
    src = next(r for r in releases if r.version == version)
    assert import_violations(use, src) == []


def test_every_attribute_the_adapter_reads_exists_in_every_release(use, releases):
    assert member_violations(use, CLASSES, releases, DECLARED) == []


def test_the_connector_implements_each_release_s_hooks_with_its_signatures(use, releases):
    assert hook_violations(use, releases, DECLARED) == []


def test_each_declared_difference_is_what_the_releases_show(releases):
    assert declared_violations(DECLARED, releases) == []


@pytest.mark.parametrize("module", sorted(HASH_FUNCTIONS))
def test_the_block_hash_functions_are_the_same_text_in_every_release(releases, module):
    for name in HASH_FUNCTIONS[module]:
        texts = {src.version: source_of(src, module, name) for src in releases}
        assert None not in texts.values(), f"{module}.{name} missing: {texts}"
        assert len(set(texts.values())) == 1, f"{module}.{name} differs between releases"


@pytest.mark.parametrize("version", COMPAT.TESTED_RELEASES)
@pytest.mark.parametrize("salt", [None, "tenant-a"])
def test_each_release_s_request_hasher_gives_the_installed_release_s_block_hashes(
        releases, version, salt):
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.request import Request

    hash_fn = get_hash_fn_by_name("sha256")
    kv_cache_utils.init_none_hash(hash_fn)
    src = next(r for r in releases if r.version == version)
    theirs = release_function(src, "vllm.v1.core.kv_cache_utils", "get_request_block_hasher")
    request = Request("r", [(i * 7919) % 50000 for i in range(1000)], SamplingParams(max_tokens=1),
                      None, cache_salt=salt)
    ours = kv_cache_utils.get_request_block_hasher(16, hash_fn)(request)
    assert len(ours) == 1000 // 16
    assert theirs(16, hash_fn)(request) == ours


def test_pyproject_admits_exactly_the_tested_releases():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    first, last = (tuple(map(int, v.split(".")[:2])) for v in
                   (COMPAT.TESTED_RELEASES[0], COMPAT.TESTED_RELEASES[-1]))
    wanted = f"vllm>={first[0]}.{first[1]},<{last[0]}.{last[1] + 1}"
    for extra in ("cuda", "cuda12"):
        (vllm,) = [d for d in project["optional-dependencies"][extra] if re.match(r"vllm\b", d)]
        assert vllm.replace(" ", "") == wanted, extra


# -- the checks catch what they are for (on sources made up here, not on vLLM's) --------

def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_field_that_a_later_release_removed_is_caught(tmp_path):
    old = tmp_path / "old"
    new = tmp_path / "new"
    _write(old, "vllm/out.py", "class Cached:\n    req_ids: list\n    resumed_req_ids: set\n")
    _write(new, "vllm/out.py", "class Cached:\n    req_ids: list\n")
    releases = [ReleaseSources("0.1.0", old), ReleaseSources("0.2.0", new)]
    code = _write(tmp_path, "adapter.py", "def plan(cached):\n"
                                          "    return [r for r in cached.req_ids if r in cached.resumed_req_ids]\n")
    use = adapter_use([code], "Nothing")
    (problem,) = member_violations(use, [("vllm.out", "Cached")], releases, [])
    assert "resumed_req_ids" in problem and "0.2.0" in problem
    declared = [Declared("0.2.0", "vllm.out", "Cached", "resumed_req_ids", added=False)]
    (problem,) = member_violations(use, [("vllm.out", "Cached")], releases, declared)
    assert "adapter.py" in problem and "only vllm_compat.py may" in problem
    assert member_violations(use, [("vllm.out", "Cached")], releases, declared,
                             compat_file="adapter.py") == []
    assert declared_violations(declared, releases) == []
    wrong = [Declared("0.1.0", "vllm.out", "Cached", "resumed_req_ids", added=False)]
    assert len(declared_violations(wrong, releases)) == 1


def test_a_misspelled_hook_and_a_changed_signature_are_caught(tmp_path):
    base = ("from abc import ABC, abstractmethod\n"
            "class KVConnectorBase_V1(ABC):\n"
            "    @abstractmethod\n"
            "    def start_load_kv(self, forward_context, **kwargs): ...\n"
            "    def request_finished(self, request, block_ids): ...\n"
            "class SupportsHMA(ABC):\n    pass\n")
    _write(tmp_path / "r", "vllm/distributed/kv_transfer/kv_connector/v1/base.py", base)
    code = _write(tmp_path, "adapter.py",
                  "class C:\n"
                  "    def request_finished(self, request): ...\n"
                  "    def wait_for_layer_laod(self, layer_name): ...\n")
    problems = hook_violations(adapter_use([code], "C"), [ReleaseSources("0.1.0", tmp_path / "r")], [])
    assert any("wait_for_layer_laod" in p and "misspelled" in p for p in problems)
    assert any(p.startswith("request_finished") and "does not match" in p for p in problems)
    assert any("abstract start_load_kv" in p for p in problems)
