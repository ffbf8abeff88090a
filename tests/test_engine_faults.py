"""Faults under real vLLM engines: two nodes without shared file events, planted bad files,
eviction after lookup, a read-only restart. The answer never changes: every engine's greedy
tokens equal those of an engine without the cache.

Four engine start-ups in all, two at a time: A and B (one FUSE mount of the cache each,
like two NFS clients), then a restarted read-only engine R beside a no-cache baseline.
"""

import json
import os
import random
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from cachedir import read_chunk_file, wait_for_count
from engines import EngineProcess
from mounts import bindfs_view, read_only_view

from lmcache_fs.ops.eviction import Evictor
from lmcache_fs.ops.inspection import read_header
from lmcache_fs.ops.inventory import (
    namespace_dirs,
    scan_chunks,
    scan_directory,
    scan_quarantine,
    total_size,
)
from lmcache_fs.storage.codec import ChunkFileError, write_chunk_file
from lmcache_fs.storage.layout import chunk_path

pytestmark = pytest.mark.engine

CHUNK_TOKENS = 256
PROMPT_TOKENS = 800  # 3 full chunks; vLLM computes the rest
rng = random.Random(0)
PROMPTS = [[rng.randrange(3, 250) for _ in range(PROMPT_TOKENS)] for _ in range(11)]
LONG = [rng.randrange(3, 250) for _ in range(4 * CHUNK_TOKENS + 40)]  # 4 full chunks
P_FIRST, P_EVICT, P_BAD = 0, 1, range(2, 11)
BAD_KINDS = ["bit flip in the data", "truncated", "zero length", "garbage",
             "a valid chunk of another namespace", "a valid chunk of another shape",
             "a valid chunk of another key", "a directory", "a symlink outside the storage path"]
TEXT = "".join(random.Random(1).choice("abcdefghij klmnop,.") for _ in range(2 * CHUNK_TOKENS + 40))
CLI = Path(sys.executable).with_name("lmcache-fs")


def _spec(run, name, connector, core):
    """An engine on one OpenMP thread bound to ``core``.

    vLLM's CPU build reserves one more core when a KV connector is configured, so
    on a 2-core machine an engine with the connector would compute with 2 threads
    and one without it with 1: another summation order, and a random model's
    near-tied logits then pick other tokens. One thread each makes the no-cache
    comparison exact.
    """
    return {"model": run["model"], "log_path": run["logs"] / f"faults-engine-{name}.log",
            "connector": connector, "env": {"VLLM_CPU_OMP_THREADS_BIND": str(core)}}


def _connector(storage_path, role="kv_both"):
    return {"kv_connector": "LMCacheFSConnector", "kv_role": role,
            "kv_connector_extra_config": {"storage_path": str(storage_path)}}


def _start(*specs):
    """Start engines (EngineProcess keyword arguments each) at once; returns them in order."""
    engines: list = [None] * len(specs)
    errors = []

    def start(i, spec):
        try:
            engines[i] = EngineProcess(**spec)
        except Exception as exc:  # reported below, after the others are up or failed
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i, s)) for i, s in enumerate(specs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for engine in engines:
            if engine is not None:
                engine.close()
        raise errors[0]
    return engines


def _key(prompt, index):
    """The key the engines give chunk ``index`` of ``prompt`` (vLLM's hash of its last block)."""
    from lmcache_fs.connector.prompt_keys import chunk_keys

    return chunk_keys(prompt, CHUNK_TOKENS, 128)[index]


def _chunk_files(source):
    return {c.key: Path(c.path) for ns in namespace_dirs(source) for c in scan_chunks(ns)}


def _wait_for_chunks(source, n):
    return wait_for_count(lambda: _chunk_files(source), n)


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic_model, artifacts_dir):
    """The shared directory, the model, and what each engine answered (no mount needed)."""
    root = tmp_path_factory.mktemp("engine-faults")
    source = root / "kv"
    source.mkdir()
    notes: dict = {}  # what each fault did, for tests/artifacts/faults-engine.json
    yield {"source": source, "root": root, "model": synthetic_model, "logs": artifacts_dir,
           "tokens": {}, "notes": notes}
    (artifacts_dir / "faults-engine.json").write_text(json.dumps(notes, indent=2) + "\n")


@pytest.fixture(scope="module")
def views(run):
    """Where engines A and B see the directory: one FUSE mount each (like two NFS clients).

    Only the two-node test needs the mounts. Where FUSE is unavailable both
    engines use the directory itself and that one test skips, naming why;
    every other fault still runs.
    """
    with ExitStack() as mounts:
        try:
            found = {"a": mounts.enter_context(bindfs_view(run["source"], run["root"] / "node-a")),
                     "b": mounts.enter_context(bindfs_view(run["source"], run["root"] / "node-b")),
                     "no_mounts": ""}
        except pytest.skip.Exception as exc:
            found = {"a": run["source"], "b": run["source"], "no_mounts": str(exc)}
        yield found


@pytest.fixture(scope="class")
def nodes(run, views):
    """Engines A and B, started together, each on its own view of the directory."""
    a, b = _start(_spec(run, "a", _connector(views["a"]), core=0),
                  _spec(run, "b", _connector(views["b"]), core=1))
    yield a, b
    a.close()
    b.close()


def _plant(kind, path, files, tmp):
    """Replace the chunk file at ``path`` by a bad entry of ``kind``."""
    raw = bytearray(path.read_bytes())
    header_json = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    meta = header_json["__metadata__"]
    shape = header_json["kv"]["shape"]
    path.unlink()
    if kind == "bit flip in the data":
        raw[-5] ^= 0x01
        path.write_bytes(raw)
    elif kind == "truncated":
        path.write_bytes(raw[:-4096])
    elif kind == "zero length":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(random.Random(2).randbytes(len(raw)))
    elif kind == "a valid chunk of another namespace":
        write_chunk_file(path, torch.randn(shape).to(torch.bfloat16),
                         {"namespace": "other-model-0123456789abcdef", "key": meta["key"]})
    elif kind == "a valid chunk of another shape":
        write_chunk_file(path, torch.randn([shape[0] + 1, *shape[1:]]).to(torch.bfloat16),
                         {"namespace": meta["namespace"], "key": meta["key"]})
    elif kind == "a valid chunk of another key":  # real KV of this model, of another prefix
        path.write_bytes(files[meta["parent_key"]].read_bytes())
    elif kind == "a directory":
        path.mkdir()
    elif kind == "a symlink outside the storage path":
        outside = tmp / f"outside-{meta['key'][:8]}.safetensors"
        outside.write_bytes(raw)  # the very chunk, valid, but outside: still never read
        os.symlink(outside, path)


def _wait_for_valid_chunk(path, what, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            header = read_header(path)
            read_chunk_file(path, torch.empty(header.shape, dtype=header.dtype), {"key": path.stem})
            return
        except (OSError, ChunkFileError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: no good copy was stored again ({exc})") from exc
            time.sleep(0.1)


class TestTwoNodesWithoutSharedFileEvents:

    def test_engine_a_stores_the_chunks_of_every_prompt(self, run, nodes):
        a, _ = nodes
        for i, out in enumerate(a.generate(PROMPTS)):  # cold: A's answers are the no-hit ones
            run["tokens"][("A cold", i)] = out["token_ids"]
        files = _wait_for_chunks(run["source"], 3 * len(PROMPTS))
        assert len(files) == 3 * len(PROMPTS)

    def test_the_engine_on_mount_b_hits_chunks_the_engine_on_mount_a_wrote(self, run, views, nodes):
        if views["no_mounts"]:
            pytest.skip(views["no_mounts"])
        _, b = nodes
        [hit] = b.generate([PROMPTS[P_FIRST]])  # B was up before A wrote: no event told it
        assert hit["num_cached_tokens"] == 3 * CHUNK_TOKENS
        assert hit["token_ids"] == run["tokens"][("A cold", P_FIRST)]
        run["notes"]["two_mounts"] = f"B hit {hit['num_cached_tokens']}/{PROMPT_TOKENS} tokens written by A"

    def test_planted_bad_files_are_misses_and_the_tokens_do_not_change(self, run, nodes):
        _, b = nodes
        files = _chunk_files(run["source"])
        planted = {}
        for kind, p in zip(BAD_KINDS, P_BAD):
            planted[kind] = _key(PROMPTS[p], 1)  # the second chunk: the first still hits
            _plant(kind, files[planted[kind]], files, run["root"])
        outs = b.generate([PROMPTS[p] for p in P_BAD])
        for (kind, p), out in zip(zip(BAD_KINDS, P_BAD), outs):
            assert out["token_ids"] == run["tokens"][("A cold", p)], kind
        assert b.proc.poll() is None  # no crash
        assert len(list(scan_quarantine(run["source"]))) == len(BAD_KINDS)
        assert b.log_text().count("unusable") >= len(BAD_KINDS)  # each loaded as a miss
        # B recomputed each damaged chunk and stored a good copy in its place.
        for kind, key in planted.items():
            _wait_for_valid_chunk(files[key], kind)
        run["notes"]["planted_in_engine"] = {k: "miss, quarantined, same tokens" for k in BAD_KINDS}

    def test_chunks_evicted_after_the_lookup_are_recomputed(self, run, nodes):
        _, b = nodes
        [first] = b.generate([PROMPTS[P_EVICT]])
        assert first["num_cached_tokens"] == 3 * CHUNK_TOKENS
        b.reset_prefix_cache()  # the next request must load from files again
        files = _chunk_files(run["source"])
        victims = [_key(PROMPTS[P_EVICT], c) for c in range(3)]
        report = self._evict_exactly(run["source"], [files[k] for k in victims])
        assert report.evicted_chunks == 3
        [again] = b.generate([PROMPTS[P_EVICT]])  # B's index still lists them: loads get "missing"
        assert again["token_ids"] == run["tokens"][("A cold", P_EVICT)]
        assert "unusable (missing)" in b.log_text()
        run["notes"]["evicted_after_lookup"] = "load failed as missing, recomputed, same tokens"

    def test_nothing_computed_over_a_failed_load_is_stored(self, run, nodes):
        a, b = nodes
        keys = [_key(LONG, c) for c in range(4)]
        before = len(_chunk_files(run["source"]))
        a.generate([LONG[:2 * CHUNK_TOKENS + 10]])  # A stores chunks 0 and 1 only
        files = _wait_for_chunks(run["source"], before + 2)
        # Truncated: refused before any byte lands, so chunk 0's blocks keep whatever they
        # held (a bit flip would load nearly right KV and hide what this test looks for).
        _plant("truncated", files[keys[0]], files, run["root"])
        # B finds chunks 0 and 1, fails to load chunk 0 and, in the same step, computes
        # chunks 2 and 3 over blocks that never got chunk 0's KV.
        [out] = b.generate([LONG])
        assert "holding back" in b.log_text()
        run["tokens"]["B long"] = out["token_ids"]
        # Once vLLM has recomputed, B stores chunk 0 again, and chunks 2 and 3 for the first
        # time; TestRestart checks that an engine loading all four answers like no cache.
        for c in (0, 2, 3):
            _wait_for_valid_chunk(chunk_path(files[keys[0]].parent.parent, keys[c]),
                                  f"chunk {c}")
        run["notes"]["failed_load_same_step"] = "chunks 2-3 withheld, stored after the recompute"

    def test_pinning_by_prompt_text_selects_the_chunks_the_engine_stored(self, run, nodes):
        from lmcache_fs.connector.prompt_keys import tokenize

        a, _ = nodes
        ids = tokenize(str(run["model"]), TEXT)
        before = set(_chunk_files(run["source"]))
        a.generate([ids])
        stored = set(_wait_for_chunks(run["source"], len(before) + 2)) - before
        prompt_file = run["root"] / "prompt.txt"
        prompt_file.write_text(TEXT)
        done = subprocess.run([str(CLI), "pin", "--model", str(run["model"]), "--prompt-file",
                               str(prompt_file), "--storage-path", str(run["source"]), "--json"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        [pin] = json.loads(done.stdout)["pins"]
        assert pin["chunks"] == pin["present"] == len(stored) == 2
        assert pin["name"] in stored
        run["notes"]["pin_by_prompt"] = f"CLI keys == engine keys for {len(stored)} chunks"

    @staticmethod
    def _evict_exactly(source, paths):
        """Make ``paths`` the least recently used and run a real pass whose budget removes just
        them (after the quarantined files, which always go first)."""
        for path in paths:
            os.utime(path, (time.time() - 3600, time.time() - 3600))
        contents = scan_directory(source)
        total, quarantined = contents.bytes, total_size(contents.quarantined)
        victims = sum(p.stat().st_size for p in paths)
        evictor = Evictor(source, max_bytes=total, high_watermark=0.99,
                          low_watermark=(total - quarantined - victims + 1000) / total)
        try:
            return evictor.run_pass()
        finally:
            evictor.close()


class TestRestart:

    def test_a_restarted_read_only_engine_reuses_chunks_at_once_and_answers_like_no_cache(self, run):
        with ExitStack() as stack:
            try:  # the mount makes "read-only" EROFS; without one the consumer role alone holds
                ro = stack.enter_context(read_only_view(run["source"], run["root"] / "read-only"))
                seen_through = "a read-only mount"
            except pytest.skip.Exception as exc:
                ro, seen_through = run["source"], f"the directory itself ({exc})"
            restarted, baseline = _start(_spec(run, "restarted", _connector(ro, "kv_consumer"), core=0),
                                         _spec(run, "baseline", None, core=1))
            try:
                [first] = restarted.generate([PROMPTS[P_FIRST]])
                assert first["num_cached_tokens"] == 3 * CHUNK_TOKENS  # the first request hits
                outs = restarted.generate(PROMPTS)
                reference = baseline.generate(PROMPTS)
                [long_out] = restarted.generate([LONG])  # all four chunks B stored
                [long_ref] = baseline.generate([LONG])
                assert "chunks found at start-up" in restarted.log_text()
            finally:
                restarted.close()
                baseline.close()
        for i, (out, ref) in enumerate(zip(outs, reference)):
            assert out["token_ids"] == ref["token_ids"], f"prompt {i}"
            assert run["tokens"][("A cold", i)] == ref["token_ids"], f"prompt {i}"
        assert first["token_ids"] == reference[P_FIRST]["token_ids"]
        assert long_out["num_cached_tokens"] == 4 * CHUNK_TOKENS
        assert long_out["token_ids"] == long_ref["token_ids"] == run["tokens"]["B long"]
        run["notes"]["read_only_restart"] = (
            f"first request hit {first['num_cached_tokens']}/{PROMPT_TOKENS} tokens; all {len(PROMPTS)} "
            f"prompts give the no-cache engine's tokens; directory seen through {seen_through}")
