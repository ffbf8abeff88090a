"""Smoke tests of the benchmarks at tiny sizes: the code paths run, nothing is timed."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from bench import chunkdata, integrity, lookup, pagecache, storage
from bench.lmcache_env import lmcache_installed, venv_python
from bench.lmcache_proxy import LMCacheWorker
from bench.run import main, parse_args


def _quick(tmp_path: Path, *suites: str) -> list[Path]:
    return main([*suites, "--quick", "--no-lmcache", "--results-dir", str(tmp_path / "results"),
                 "--work-dir", str(tmp_path / "work")])


def test_quick_storage_run_writes_a_table_row_for_every_local_path(tmp_path: Path) -> None:
    # Guards against a competitor silently dropping out of the table.
    written = _quick(tmp_path, "storage")
    text = (tmp_path / "results" / "storage.md").read_text()
    for name in (storage.BASELINE, storage.CONNECTOR_PATH, "lmcache-fs BackgroundWriter"):
        assert re.search(rf"^\| {re.escape(name)}.*\| \d+\.\d\d \(", text, re.M), name
    assert "python -m bench.run storage --quick" in text
    assert "LMCache: not measured (--no-lmcache)" in text
    assert not (tmp_path / "work" / "storage").exists(), "chunk files must be cleaned up"
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "results" / "storage.png") in written


def test_quick_integrity_run_sets_every_keyed_path_against_the_same_path_unkeyed(tmp_path: Path) -> None:
    # Guards against a keyed row, its ratio, the goal line or a check timed alone dropping out.
    _quick(tmp_path, "integrity")
    text = (tmp_path / "results" / "integrity.md").read_text()
    for keyed, plain in integrity.KEYED_PAIRS.items():
        assert re.search(rf"^\| {re.escape(plain)} \| \d+\.\d\d \(", text, re.M), plain
        assert re.search(rf"^\| {re.escape(keyed)} \|.* \| \d+% \(\d+%-\d+%\) \|$", text, re.M), keyed
    assert re.search(r"^Goal: warm loads with a key .*: \d+% \((met|MISSED)\); in CPU time, \d+%\.$",
                     text, re.M)
    for check in integrity.CHECKS:
        assert re.search(rf"^\| {re.escape(check.label)} \| \d+\.\d\d \(", text, re.M), check.label
    assert not (tmp_path / "work" / "integrity").exists(), "chunk files must be cleaned up"


def test_quick_lookup_run_reports_every_method_and_keeps_its_tree(tmp_path: Path) -> None:
    # Guards against the lookup table losing a method, and against rebuilding trees every run.
    _quick(tmp_path, "lookup")
    text = (tmp_path / "results" / "lookup.md").read_text()
    cells = len(lookup.METHODS) * len(lookup.CASES)
    assert re.search(rf"^\| 600 \|( [\d.]+ (us|ms) \|){{{cells}}}$", text, re.M)
    assert "Start-up scan of" not in text  # the 100k-file scan goal needs the full run
    assert list((tmp_path / "work" / "lookup-trees").glob("files-600/.complete"))


def test_quick_block_copy_run_times_both_ways_of_both_directions(tmp_path: Path) -> None:
    _quick(tmp_path, "block-copy-cpu")
    text = (tmp_path / "results" / "block-copy-cpu.md").read_text()
    for way in ("gather, numpy", "gather, torch copy_ per page", "scatter, numpy",
                "scatter, torch copy_ per page"):
        for ids in ("contiguous", "scattered"):
            assert re.search(rf"^\| {re.escape(way)} \| {ids} \| \d+\.\d\d \|", text, re.M)


def test_unknown_suite_is_rejected() -> None:
    with pytest.raises(SystemExit):
        parse_args(["nonsense"])


def test_both_virtualenvs_build_the_same_chunk_bytes() -> None:
    # The LMCache worker regenerates the chunks from the seed: equal bytes make the comparison fair.
    a = chunkdata.make_chunks(chunkdata.chunk_shape(1, 16), 3, seed=7)
    b = chunkdata.make_chunks(chunkdata.chunk_shape(1, 16), 3, seed=7)
    as_bytes = [x.view(torch.uint8) for x in a + b]  # random bf16 holds NaNs: compare bytes
    assert all(x.equal(y) for x, y in zip(as_bytes[:3], as_bytes[3:]))
    assert not as_bytes[0].equal(as_bytes[1])


def test_eviction_leaves_no_page_of_the_file_cached(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * (1 << 20))
    pagecache.evict([path])
    resident = pagecache.resident_fraction(path)
    if resident is None:
        pytest.skip("fincore (util-linux) is not installed")
    assert resident == 0.0


def test_lmcache_worker_stores_loads_and_finds_chunks(tmp_path: Path) -> None:
    # Guards the JSON protocol and the three LMCache paths against API drift.
    if not lmcache_installed():  # checked here, not at collection: it imports LMCache (seconds)
        pytest.skip("LMCache venv not installed (python -m bench.run sets it up)")
    with LMCacheWorker(venv_python(), tmp_path / "worker.log") as worker:
        worker.call("case", shape=[1, 2, 16, 1, 8], count=4, seed=0, dir=str(tmp_path / "cpu"))
        for path in ("local_disk", "fs_connector", "native"):
            worker.call("open", path=path, dir=str(tmp_path / path))
            assert worker.call("store")["seconds"] > 0
            assert worker.call("load")["seconds"] > 0
            assert worker.call("lookup", hashes=[1, 2, 3, 4, 5], repeats=1)["found"] == 4
            worker.call("close")
