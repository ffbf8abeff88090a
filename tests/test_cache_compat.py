"""A cache directory written by an earlier lmcache-fs is read, loaded and counted by this one.

``tests/data/cache-before-layout-map/`` was written by lmcache-fs at 90ed35d, before the
on-disk map moved into one module: a namespace with its manifest, a hash-seed marker,
two chained chunks, a pin, and the eviction pass's usage record. Namespace names, paths
and the file format must stay what they were, or every cache on disk would be lost
at an upgrade.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from lmcache_fs.ops.inventory import scan_directory
from lmcache_fs.ops.pins import PinStore
from lmcache_fs.storage.index import ChunkIndex
from lmcache_fs.storage.layout import ChunkLayout, Namespace
from lmcache_fs.storage.manifest import read_manifest
from lmcache_fs.storage.store import ChunkStore
from lmcache_fs.storage.usage import read_usage

DATA = Path(__file__).parent / "data"
WRITTEN = json.loads((DATA / "cache-before-layout-map.json").read_text())
SHAPE = (2, 2, 1, 16, 8)  # layers, blocks of a chunk, KV heads, block size, 2 x head size


@pytest.fixture
def cache(tmp_path) -> Path:
    root = tmp_path / "kv"
    shutil.copytree(DATA / "cache-before-layout-map", root)
    return root


def test_the_namespace_keeps_its_name_and_manifest(cache):
    namespace = Namespace(WRITTEN["fields"])
    assert namespace.name == WRITTEN["namespace"]
    assert read_manifest(cache / namespace.name) == namespace.fields


def test_its_chunks_are_found_and_load_bit_exactly(cache):
    layout = ChunkLayout(cache, Namespace(WRITTEN["fields"]))
    index = ChunkIndex(layout)
    assert index.scan() == 2
    store = ChunkStore(layout)
    parent = ""
    for key, digest in zip(WRITTEN["keys"], WRITTEN["data_sha256"]):
        out = torch.empty(SHAPE, dtype=torch.bfloat16)
        header = store.load(key, out)
        assert hashlib.sha256(out.view(torch.int16).numpy().tobytes()).hexdigest() == digest
        assert header.metadata["parent_key"] == parent
        parent = key
        assert ChunkIndex(layout).contains(key)  # by a stat of its path, as on NFS


def test_its_pins_usage_record_and_contents_are_read(cache):
    namespace_dir = cache / WRITTEN["namespace"]
    (pin,) = PinStore(namespace_dir).pins()
    assert list(pin.keys) == WRITTEN["keys"]
    assert read_usage(cache) == (10240, 1 << 30)
    contents = scan_directory(cache)
    (summary,) = contents.namespaces
    assert (summary.name, summary.chunks, summary.pins) == (WRITTEN["namespace"], 2, 1)
    assert contents.temporaries == [] and contents.quarantined == []


def test_its_hash_seed_marker_is_recognised(cache, caplog):
    pytest.importorskip("vllm")
    from lmcache_fs.connector.namespace import check_hash_seed

    with caplog.at_level(logging.WARNING):
        check_hash_seed(cache / WRITTEN["namespace"], "sha256")  # the seed it was written with
    assert not [r for r in caplog.records if "different seed" in r.getMessage()]
    markers = [p.name for p in (cache / WRITTEN["namespace"]).iterdir() if p.name.startswith("hash")]
    assert len(markers) == 1  # the same marker: none added
