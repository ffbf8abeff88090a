"""Bounded filesystem calls and the breaker: a hung or dead mount costs misses, not a stall."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

import pytest
from cachedir import FakeClock
from mounts import freezable_view

from lmcache_fs.storage.breaker import Breaker, DirectoryUnavailable


def _blocking(release: threading.Event):
    def call(*_):
        release.wait()
        return "late"
    return call


def test_calls_answer_and_a_missing_file_is_no_outage(tmp_path):
    breaker = Breaker(tmp_path)
    assert breaker.call(os.listdir, tmp_path, deadline_s=1.0, what="scan") == []
    with pytest.raises(FileNotFoundError):
        breaker.call(os.stat, tmp_path / "absent", deadline_s=1.0, what="stat")
    assert breaker.available and breaker.trips == 0


def test_a_call_past_its_deadline_is_a_miss_and_switches_the_directory_off(tmp_path, caplog):
    clock = FakeClock(100.0)
    breaker = Breaker(tmp_path, cooldown_s=5.0, clock=clock)
    release = threading.Event()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(DirectoryUnavailable):
        breaker.call(_blocking(release), deadline_s=0.1, what="stat")
    assert time.monotonic() - start < 1.0
    assert breaker.timeouts["stat"] == 1 and breaker.trips == 1 and not breaker.available
    assert "is not answering (a stat did not return within 100 ms)" in caplog.text
    calls = []
    with pytest.raises(DirectoryUnavailable):  # refused at once: no call, no new thread
        breaker.call(lambda: calls.append(1), deadline_s=1.0, what="stat")
    assert calls == [] and breaker.refused == 1
    release.set()


def test_after_the_cooldown_one_canary_switches_it_back_on(tmp_path, caplog):
    clock = FakeClock(100.0)
    breaker = Breaker(tmp_path, cooldown_s=5.0, clock=clock)
    breaker.note_error(OSError(errno.ENOTCONN, "Transport endpoint is not connected"), "read")
    assert not breaker.available
    clock.now += 5.0
    with caplog.at_level(logging.WARNING):
        assert not breaker.available  # starts the canary; still off until it answers
        deadline = time.monotonic() + 5
        while "answers again" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
    assert breaker.available and "answers again" in caplog.text


def test_a_canary_that_fails_doubles_the_cooldown(tmp_path):
    clock = FakeClock(100.0)
    missing = tmp_path / "gone"
    missing.mkdir()
    breaker = Breaker(missing, cooldown_s=5.0, max_cooldown_s=12.0, clock=clock)
    breaker.note_timeout("stat", 0.1)
    missing.rmdir()  # the canary's stat fails
    original_stat = os.stat

    def unreachable(path, *a, **k):
        if os.fspath(path) == str(missing):
            raise OSError(errno.EIO, "Input/output error")
        return original_stat(path, *a, **k)

    os.stat = unreachable
    try:
        for expected in (10.0, 12.0):
            clock.now += 100.0
            breaker.available
            deadline = time.monotonic() + 5
            while breaker._canary_running and time.monotonic() < deadline:
                time.sleep(0.01)
            assert breaker._backoff == expected and not breaker.available
    finally:
        os.stat = original_stat


def test_outage_errors_trip_it_and_other_errors_do_not(tmp_path):
    breaker = Breaker(tmp_path)

    def fails(code):
        def call():
            raise OSError(code, os.strerror(code))
        return call

    for code in (errno.ENOENT, errno.EACCES, errno.ELOOP):
        with pytest.raises(OSError):
            breaker.call(fails(code), deadline_s=1.0, what="open")
    assert breaker.available
    with pytest.raises(OSError):
        breaker.call(fails(errno.ESTALE), deadline_s=1.0, what="open")
    assert not breaker.available and breaker.errors["ESTALE"] == 1


def test_stuck_calls_are_capped_and_their_threads_come_back(tmp_path):
    clock = FakeClock(0.0)
    breaker = Breaker(tmp_path, max_stuck_threads=2, clock=clock)
    release = threading.Event()
    for _ in range(2):
        with pytest.raises(DirectoryUnavailable):
            breaker.call(_blocking(release), deadline_s=0.01, what="read")
        breaker._open_until = None  # (as if a canary had answered: test the cap alone)
    with pytest.raises(DirectoryUnavailable, match="too many calls stuck"):
        breaker.call(os.getpid, deadline_s=1.0, what="stat")
    release.set()
    deadline = time.monotonic() + 5
    while breaker._helpers.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    breaker._open_until = None
    assert breaker.call(os.getpid, deadline_s=1.0, what="stat") == os.getpid()


def test_a_frozen_fuse_mount_costs_the_deadline_and_a_dead_one_fails_at_once(tmp_path):
    source = tmp_path / "source"
    (source / "ns").mkdir(parents=True)
    with freezable_view(source, tmp_path / "mnt") as view:
        breaker = Breaker(view.path, cooldown_s=0.2)
        assert breaker.call(os.listdir, view.path, deadline_s=2.0, what="scan") == ["ns"]
        view.freeze()
        start = time.monotonic()
        with pytest.raises(DirectoryUnavailable):
            breaker.call(os.stat, view.path / "ns", deadline_s=0.2, what="stat")
        assert time.monotonic() - start < 1.0
        view.thaw()
        deadline = time.monotonic() + 10
        while not breaker.available and time.monotonic() < deadline:
            time.sleep(0.05)
        assert breaker.available  # the canary got its answer
        view.kill()
        with pytest.raises(OSError) as raised:  # (a listing: the kernel caches what it stat'ed)
            breaker.call(os.listdir, view.path, deadline_s=2.0, what="scan")
        assert raised.value.errno == errno.ENOTCONN and not breaker.available
