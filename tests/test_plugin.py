"""vLLM finds the connector by name alone (plugin entry point) and by explicit module path,
and the connector refuses engines whose KV it could not reuse faithfully."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from lmcache_fs.connector import LMCacheFSConnector  # noqa: E402
from lmcache_fs.connector.plugin import register  # noqa: E402
from vllm.config import KVTransferConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.plugins import load_general_plugins  # noqa: E402


def test_installed_plugin_registers_the_name():
    load_general_plugins()
    config = KVTransferConfig(kv_connector="LMCacheFSConnector", kv_role="kv_both")
    assert KVConnectorFactory.get_connector_class(config) is LMCacheFSConnector


def test_registering_twice_is_harmless():
    register()
    register()
    config = KVTransferConfig(kv_connector="LMCacheFSConnector", kv_role="kv_both")
    assert KVConnectorFactory.get_connector_class(config) is LMCacheFSConnector


def test_explicit_module_path_works():
    config = KVTransferConfig(kv_connector="LMCacheFSConnector", kv_role="kv_both",
                              kv_connector_module_path="lmcache_fs.connector")
    assert KVConnectorFactory.get_connector_class(config) is LMCacheFSConnector


def _kv_cache_config(*specs):
    return SimpleNamespace(kv_cache_groups=[
        SimpleNamespace(kv_cache_spec=s, layer_names=[f"model.layers.{i}.attn"])
        for i, s in enumerate(specs)])


def _spec(kind=None, **extra):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return (kind or FullAttentionSpec)(**{"block_size": 16, "num_kv_heads": 2, "head_size": 8,
                                          "dtype": torch.bfloat16, **extra})


def test_full_attention_on_one_stage_is_supported():
    from lmcache_fs.connector.supported import check_supported

    check_supported(_kv_cache_config(_spec()), SimpleNamespace(pipeline_parallel_size=1))


def test_hybrid_attention_groups_are_supported():
    # Gemma 3 / gpt-oss (sliding window), Llama 4 (chunked local), Mistral (all sliding)
    from lmcache_fs.connector.supported import check_supported
    from vllm.v1.kv_cache_interface import ChunkedLocalAttentionSpec, SlidingWindowSpec

    one_stage = SimpleNamespace(pipeline_parallel_size=1)
    for config in (_kv_cache_config(_spec(SlidingWindowSpec, sliding_window=64), _spec()),
                   _kv_cache_config(_spec(ChunkedLocalAttentionSpec, attention_chunk_size=64),
                                    _spec()),
                   _kv_cache_config(_spec(SlidingWindowSpec, sliding_window=64))):
        check_supported(config, one_stage)


def test_engines_whose_kv_could_not_be_reused_faithfully_are_refused_with_the_fix():
    from lmcache_fs.connector.supported import check_supported
    from vllm.v1.kv_cache_interface import MambaSpec, SlidingWindowSpec

    from lmcache_fs.config import ConfigError

    one_stage = SimpleNamespace(pipeline_parallel_size=1)
    mamba = MambaSpec(block_size=16, shapes=((4, 8), (2, 8, 8)), dtypes=(torch.float32,) * 2)
    cases = [  # (KV cache config, parallel config, what the error names)
        # Mamba2 hybrids (Jamba, Granite 4): a state kind untested here (GDN's are stored)
        (_kv_cache_config(_spec(SlidingWindowSpec, sliding_window=64), mamba), one_stage,
         "state of layer model.layers.1.attn.*MAMBA2 state"),
        (_kv_cache_config(_spec(), _spec(block_size=32)), one_stage, "one block size"),
        (_kv_cache_config(_spec()), SimpleNamespace(pipeline_parallel_size=2), "pipeline"),
        (_kv_cache_config(_spec()), SimpleNamespace(pipeline_parallel_size=1,
                                                    decode_context_parallel_size=2), "context"),
    ]
    for kv_cache_config, parallel, named in cases:
        with pytest.raises(ConfigError, match=f"{named}.*remove the kv-transfer-config"):
            check_supported(kv_cache_config, parallel)


def test_layer_by_layer_loads_ask_vllm_for_piecewise_cuda_graphs(tmp_path, monkeypatch):
    # A full graph replay would skip wait_for_layer_load: layers would read KV not yet loaded.
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    needs = LMCacheFSConnector.requires_piecewise_for_cudagraph
    assert needs({"storage_path": str(tmp_path), "layerwise_load": "true"})
    assert not needs({"storage_path": str(tmp_path)})  # auto: whole chunks on CUDA
    config_file = tmp_path / "lmcache-fs.yaml"
    config_file.write_text(f"storage_path: {tmp_path}\nlayerwise_load: true\n")
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(config_file))
    assert needs({})
