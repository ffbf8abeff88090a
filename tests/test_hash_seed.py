"""Instances whose prefix hashes can never match are told so at start-up, with the fix."""

import hashlib
import logging

import pytest

pytest.importorskip("vllm")

from lmcache_fs.connector.namespace import check_hash_seed, hash_seed_fingerprint  # noqa: E402
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402
from vllm.v1.core import kv_cache_utils  # noqa: E402


@pytest.mark.parametrize("seed", [None, "0", "12345"])
def test_fingerprint_is_that_of_the_seed_vllm_will_use(monkeypatch, seed):
    if seed is None:
        monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    else:
        monkeypatch.setenv("PYTHONHASHSEED", seed)
    expected = hash_seed_fingerprint("sha256")
    kv_cache_utils.init_none_hash(get_hash_fn_by_name("sha256"))
    assert expected == hashlib.sha256(bytes(kv_cache_utils.NONE_HASH)).hexdigest()[:12]


def test_a_different_seed_on_the_same_directory_is_a_warning_naming_pythonhashseed(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PYTHONHASHSEED", "1")
    check_hash_seed(tmp_path, "sha256")
    assert not caplog.records
    monkeypatch.setenv("PYTHONHASHSEED", "2")
    with caplog.at_level(logging.WARNING):
        check_hash_seed(tmp_path, "sha256")
    assert "never share chunks" in caplog.text and "PYTHONHASHSEED" in caplog.text


def test_same_seed_everywhere_is_silent(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    check_hash_seed(tmp_path, "sha256")
    with caplog.at_level(logging.WARNING):
        check_hash_seed(tmp_path, "sha256")
    assert not caplog.records


def test_random_per_process_seed_is_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    with caplog.at_level(logging.WARNING):
        check_hash_seed(tmp_path, "xxhash")
    assert "random hash seed" in caplog.text
