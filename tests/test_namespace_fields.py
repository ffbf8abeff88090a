"""Engines that would compute different KV for the same tokens never share a namespace."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from lmcache_fs.connector.namespace import namespace_fields, rank_namespace  # noqa: E402

from lmcache_fs.model_identity import weights_fingerprint  # noqa: E402


def _model_folder(path, weights: bytes):
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    (path / "model.safetensors").write_bytes(weights)
    return path


def test_fine_tunes_with_one_config_and_folder_name_differ_by_their_weights(tmp_path):
    base = bytes(range(256)) * 4096  # 1 MiB
    tuned = bytearray(base)
    tuned[len(base) // 2] ^= 1  # one weight changed, in the middle
    run_a = _model_folder(tmp_path / "run-a" / "checkpoint-1000", base)
    run_b = _model_folder(tmp_path / "run-b" / "checkpoint-1000", bytes(tuned))
    same_elsewhere = _model_folder(tmp_path / "mnt" / "node-2" / "checkpoint-1000", base)
    assert weights_fingerprint(str(run_a)) != weights_fingerprint(str(run_b))
    assert weights_fingerprint(str(run_a)) == weights_fingerprint(str(same_elsewhere))  # any mount
    assert weights_fingerprint("org/Model-7B") == ""  # a hub id: its revision names the weights


def _configs(model, quantization=None, hf_overrides=None, revision=None, commit=None):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(model=str(model), revision=revision, dtype=torch.bfloat16,
                                     quantization=quantization, hf_overrides=hf_overrides or {},
                                     hf_config=SimpleNamespace(_commit_hash=commit)),
        cache_config=SimpleNamespace(cache_dtype="auto", prefix_caching_hash_algo="sha256"),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1))
    kv_cache_config = SimpleNamespace(kv_cache_groups=[
        SimpleNamespace(kv_cache_spec=spec, layer_names=["l0", "l1"])])
    return vllm_config, kv_cache_config


def _name(*args, **kwargs) -> str:
    return rank_namespace(namespace_fields(*_configs(*args, **kwargs), 256), 0, 0).name


def test_quantization_overrides_and_hub_revisions_change_the_namespace(tmp_path):
    folder = _model_folder(tmp_path / "m", b"w" * 4096)
    plain = _name(folder)
    assert _name(folder) == plain  # deterministic
    assert _name(folder, quantization="fp8") != plain
    assert _name(folder, hf_overrides={"rope_scaling": {"type": "yarn", "factor": 4}}) != plain
    assert _name(folder, hf_overrides={"b": 1, "a": 2}) == _name(folder, hf_overrides={"a": 2, "b": 1})
    # A hub id names whatever its branch held when the engine loaded it: the commit counts.
    assert _name("org/M", commit="aaa") != _name("org/M", commit="bbb")
    assert _name("org/M", revision="main", commit="aaa") != _name("org/M", revision="main", commit="bbb")
    assert _name("org/M", revision="v1") != _name("org/M", revision="v2")  # no commit known
