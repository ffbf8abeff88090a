"""Real engines on a shared directory that stops answering: they keep serving, then hit again.

Engine A serves from the cache directory itself; engine B (chunked prefill,
layer-wise loads, the CPU defaults) from a FUSE view of it, as from an NFS or
GlusterFS client. The test freezes the FUSE daemon (SIGSTOP: every call on the
mount blocks, as when an NFS server or a storage node stops answering), thaws
it, then kills it (ENOTCONN, as from a dead server). Engine C serves from a
view whose every call fails with EIO for a while (a failing disk or server),
then heals. A's answers, computed before any chunk existed, are plain vLLM's.
Each answer of B and C is timed: without deadlines, B answered nothing within
30 s while frozen (issue 24).
"""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest
from cachedir import wait_for_count
from engines import EngineProcess
from mounts import failing_view, freezable_view
from timed_answers import TimedAnswers

from lmcache_fs.storage.layout import is_temporary

pytestmark = pytest.mark.engine

CHUNK = 256
PROMPT_LEN = 1200
FULL_HIT = PROMPT_LEN // CHUNK * CHUNK  # 1024: four whole chunks, and a last token to compute
FAST_S = 8.0  # an answer "within a few seconds": deadlines of 1 s, a prefill of 1.2k tokens
# Short deadlines and cooldown: the test would otherwise wait out the defaults.
OUTAGE_SETTINGS = {"load_deadline_s": 1.0, "lookup_deadline_ms": 200, "breaker_cooldown_s": 1.0,
                   "startup_deadline_s": 5.0}

_rng = random.Random(2424)


def _prompt() -> list[int]:
    return [_rng.randrange(3, 250) for _ in range(PROMPT_LEN)]


def _connector(storage: Path) -> dict:
    return {"kv_connector": "LMCacheFSConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"storage_path": str(storage), "chunk_size": CHUNK,
                                          **OUTAGE_SETTINGS}}


def _chunk_files(storage: Path) -> list[Path]:
    return [p for p in storage.glob("*/??/*.safetensors") if not is_temporary(p.name)]


@pytest.fixture(scope="module")
def setup(synthetic_model, tmp_path_factory, artifacts_dir):
    root = tmp_path_factory.mktemp("outage")
    storage = root / "kv"
    storage.mkdir()
    with freezable_view(storage, root / "client-b") as view:
        engines = {}
        try:
            engines["a"] = EngineProcess(synthetic_model, artifacts_dir / "outage-a.log",
                                         _connector(storage))
            engines["b"] = EngineProcess(synthetic_model, artifacts_dir / "outage-b.log",
                                         _connector(view.path), max_num_batched_tokens=512)
            answers = TimedAnswers()
            yield engines["a"], engines["b"], view, storage, answers
            answers.write(artifacts_dir / "outage-times.json")
        finally:
            view.thaw()
            for engine in engines.values():
                engine.close()


def test_a_frozen_then_dead_mount_costs_recomputes_within_seconds_never_wrong_tokens(setup):
    a, b, view, storage, answers = setup
    cached, fresh, after_death = _prompt(), _prompt(), _prompt()
    plain_cached = answers.ask(a, cached, "a cached prompt")["token_ids"]
    wait_for_count(lambda: _chunk_files(storage), PROMPT_LEN // CHUNK)
    hit = answers.ask(b, cached, "b healthy")
    assert hit["num_cached_tokens"] >= FULL_HIT and hit["token_ids"] == plain_cached

    view.freeze()
    b.reset_prefix_cache()
    frozen_cached = answers.ask(b, cached, "b frozen, cached prompt")
    frozen_fresh = answers.ask(b, fresh, "b frozen, fresh prompt")  # on disk nowhere
    # (vLLM counts the planned hit in num_cached_tokens even when its load fails: the log
    # says what happened, and the tokens are what counts)
    assert frozen_cached["token_ids"] == plain_cached
    assert "unusable (no answer within the load deadline" in b.log_text()
    assert answers.seconds["b frozen, cached prompt"] < FAST_S and answers.seconds["b frozen, fresh prompt"] < FAST_S
    assert frozen_fresh["token_ids"] == answers.ask(a, fresh, "a fresh prompt")["token_ids"]

    view.thaw()
    again = answers.until_hit(b, cached, "b thawed, cached prompt", FULL_HIT)
    assert again["num_cached_tokens"] >= FULL_HIT and again["token_ids"] == plain_cached

    view.kill()  # ENOTCONN from now on, at once
    b.reset_prefix_cache()
    dead_cached = answers.ask(b, cached, "b dead mount, cached prompt")
    dead_fresh = answers.ask(b, after_death, "b dead mount, fresh prompt")
    assert dead_cached["token_ids"] == plain_cached
    assert answers.seconds["b dead mount, cached prompt"] < FAST_S
    assert answers.seconds["b dead mount, fresh prompt"] < FAST_S
    assert dead_fresh["token_ids"] == answers.ask(a, after_death, "a after death")["token_ids"]
    assert answers.ask(b, fresh, "b dead mount, again")["token_ids"] == frozen_fresh["token_ids"]
    log = b.log_text()
    assert "is not answering" in log and "answers again" in log
    assert "Traceback" not in log


@pytest.fixture(scope="module")
def failing(setup, synthetic_model, tmp_path_factory, artifacts_dir):
    a, _, _, storage, answers = setup
    with failing_view(storage, tmp_path_factory.mktemp("eio") / "client-c") as view:
        c = EngineProcess(synthetic_model, artifacts_dir / "outage-c.log", _connector(view.path),
                          max_num_batched_tokens=512)
        try:
            yield a, c, view, storage, answers
        finally:
            c.close()


def test_a_mount_failing_with_eio_costs_misses_never_a_failed_request_then_hits_again(failing):
    a, c, view, storage, answers = failing
    cached, fresh, later = _prompt(), _prompt(), _prompt()
    before = set(_chunk_files(storage))
    plain_cached = answers.ask(a, cached, "a, for c: a cached prompt")["token_ids"]
    wait_for_count(lambda: set(_chunk_files(storage)) - before, PROMPT_LEN // CHUNK)
    hit = answers.until_hit(c, cached, "c healthy", FULL_HIT)
    assert hit["num_cached_tokens"] >= FULL_HIT and hit["token_ids"] == plain_cached

    view.fail(errno.EIO)
    c.reset_prefix_cache()
    eio_cached = answers.ask(c, cached, "c EIO, cached prompt")
    eio_fresh = answers.ask(c, fresh, "c EIO, fresh prompt")
    assert eio_cached["token_ids"] == plain_cached
    assert eio_fresh["token_ids"] == answers.ask(a, fresh, "a, for c: a fresh prompt")["token_ids"]
    assert answers.seconds["c EIO, cached prompt"] < FAST_S
    assert answers.seconds["c EIO, fresh prompt"] < FAST_S
    assert not list((storage / "quarantine").glob("*"))  # an outage proves no chunk bad

    view.heal()
    again = answers.until_hit(c, cached, "c healed, cached prompt", FULL_HIT)
    assert again["num_cached_tokens"] >= FULL_HIT and again["token_ids"] == plain_cached
    # Its writer lived through the outage: a prompt first seen after it is stored again.
    before = set(_chunk_files(storage))
    answers.ask(c, later, "c healed, a new prompt")
    wait_for_count(lambda: set(_chunk_files(storage)) - before, PROMPT_LEN // CHUNK)
    log = c.log_text()
    assert "is not answering (" in log and "Input/output error" in log and "answers again" in log
    assert "Traceback" not in log
