"""What the connector does with what vLLM 0.33 and 0.34 added, where a CPU machine can check it.

(The engine tests run vLLM's CPU build, 0.32; the sources of 0.33 and 0.34 are checked by
test_vllm_contract.py. Speculative decoding with an engine: test_speculative_engines.py.)
"""

import logging
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from test_scheduler_side import CHUNK, _request, _side  # noqa: E402
from test_worker_side import KEYS, NAMES, _caches, _worker  # noqa: E402
from vllm.config import SpeculativeConfig  # noqa: E402

from lmcache_fs.config import ConfigError  # noqa: E402
from lmcache_fs.connector import vllm_compat  # noqa: E402
from lmcache_fs.connector.lmcache_fs_connector import LMCacheFSConnector  # noqa: E402
from lmcache_fs.connector.metadata import LMCacheFSMetadata, LoadOp, SaveOp  # noqa: E402
from lmcache_fs.connector.supported import check_supported  # noqa: E402


def _speculative(method: str) -> SpeculativeConfig:
    """vLLM's own config class, with only its method set (what the refusal reads)."""
    config = object.__new__(SpeculativeConfig)
    object.__setattr__(config, "method", method)
    return config


def test_speculative_decoders_with_a_kv_cache_of_their_own_are_refused_with_the_fix():
    from test_plugin import _kv_cache_config, _spec

    one_stage = SimpleNamespace(pipeline_parallel_size=1)
    for method in ("eagle", "eagle3", "mtp", "draft_model"):
        with pytest.raises(ConfigError, match=f"method '{method}'.*'ngram'.*remove the kv-transfer"):
            check_supported(_kv_cache_config(_spec()), one_stage, _speculative(method))
    for method in ("ngram", "suffix"):  # no drafter KV: supported (engine test for ngram)
        check_supported(_kv_cache_config(_spec()), one_stage, _speculative(method))
    check_supported(_kv_cache_config(_spec()), one_stage, None)


@pytest.mark.parametrize("running, warned", [("0.32.0", False), ("0.34.0", False),
                                             ("0.34.1", False), ("0.35.0", True),
                                             ("0.31.2", True)])
def test_the_start_up_line_names_vllm_and_a_release_outside_the_tested_ones_is_warned_about(
        monkeypatch, caplog, running, warned):
    import vllm

    monkeypatch.setattr(vllm, "__version__", running)
    with caplog.at_level(logging.INFO, logger=vllm_compat.logger.name):
        assert vllm_compat.log_vllm_version("9.9") == running
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == [f"lmcache-fs 9.9 on vLLM {running} (tested with vLLM 0.32.0 to 0.34.0)"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == warned
    if warned:
        assert "0.32.0 to 0.34.0" in warnings[0] and "never" not in warnings[0]


def test_sleep_ends_every_read_into_the_kv_cache_and_the_views_serve_after_wake_up(tmp_path):
    # vLLM 0.33+: unregister_kv_caches before sleep, restore_kv_caches after wake-up. The KV
    # cache keeps its addresses (its bytes are discarded), so the registered views stay valid.
    src = _caches()
    saver = _worker(tmp_path, src)
    saver.save(LMCacheFSMetadata(saves=[SaveOp("w", KEYS[0], "", 0, (3, 4, 5, 6))]))
    saver.close()
    dst = _caches(fill=0.0)
    loader = _worker(tmp_path, dst)  # layer by layer (the CPU default): reads run in the background
    connector = object.__new__(LMCacheFSConnector)
    connector._worker = loader
    loader.load(LMCacheFSMetadata(loads=[LoadOp("r", KEYS[0], 0, (10, 11, 12, 13))]))
    assert connector.supports_sleep_mode(None)
    connector.unregister_kv_caches()
    assert loader.groups[0]._layerwise is None  # no read still writing into pages being released
    for layer in range(len(NAMES)):
        assert torch.equal(dst[layer][10:14], src[layer][3:7])
    for kv in dst:
        kv.zero_()  # what sleep does to the KV cache's bytes
    connector.restore_kv_caches()
    loader.load(LMCacheFSMetadata(loads=[LoadOp("r", KEYS[0], 0, (20, 21, 22, 23))]))
    assert loader.take_failed_blocks() == set()  # (ends the step's reads first)
    for layer in range(len(NAMES)):
        assert torch.equal(dst[layer][20:24], src[layer][3:7])
    loader.close()


def test_may_load_async_is_asked_only_of_engines_that_load_asynchronously(tmp_path):
    # vLLM 0.34, with --max-num-inflight-kv-loads: a True lets the request's loads start while
    # the running batch is full. Only engines of several KV cache groups load asynchronously.
    side, index = _side(tmp_path)
    request = _request("r", 3 * CHUNK)
    index.add(side.chunk_keys(request, CHUNK)[0])
    connector = object.__new__(LMCacheFSConnector)
    connector._scheduler = side
    for async_loads, expected in ((True, True), (False, False)):
        side.async_loads = async_loads
        assert connector.may_load_async(request) is expected
