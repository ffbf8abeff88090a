"""The cross-node lease: one holder at a time, an expired holder is taken over."""

import errno
import json
import multiprocessing
import os

import pytest
from cachedir import FakeClock

from lmcache_fs.storage.layout import is_temporary
from lmcache_fs.ops.lease import Lease, read_lease


def fill_filesystem(monkeypatch):
    """Make the filesystem full: creating a file fails with ENOSPC, rewriting one in place works."""
    real_open = os.open

    def full_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", full_open)


def test_first_acquirer_holds_and_the_others_are_refused(tmp_path):
    first, second = Lease(tmp_path / "l", 30), Lease(tmp_path / "l", 30)
    assert first.acquire() and first.held
    assert not second.acquire() and not second.held
    assert read_lease(tmp_path / "l").pid == os.getpid()


def test_a_released_lease_can_be_taken_at_once(tmp_path):
    first, second = Lease(tmp_path / "l", 30), Lease(tmp_path / "l", 30)
    first.acquire()
    first.release()
    assert second.acquire()


def test_an_expired_holder_is_taken_over_and_learns_it_on_renewal(tmp_path):
    clock = FakeClock(1_000_000.0)
    stalled, taker = Lease(tmp_path / "l", 30, clock=clock), Lease(tmp_path / "l", 30, clock=clock)
    assert stalled.acquire()
    clock.now += 29
    assert not taker.acquire()  # still valid
    clock.now += 2
    assert taker.acquire()
    assert not stalled.renew() and not stalled.held
    assert taker.renew()


def test_renewal_keeps_a_live_holder(tmp_path):
    clock = FakeClock(1_000_000.0)
    holder, other = Lease(tmp_path / "l", 30, clock=clock), Lease(tmp_path / "l", 30, clock=clock)
    holder.acquire()
    for _ in range(5):
        clock.now += 20
        assert holder.renew_if_due()
        assert not other.acquire()


def test_a_garbage_lease_file_is_taken_over_once_a_ttl_old(tmp_path):
    path = tmp_path / "l"
    path.write_text("not json")
    lease = Lease(path, 30)
    assert not lease.acquire()  # could be a lease being written: wait a TTL
    os.utime(path, (0, 0))
    assert lease.acquire()


def _race(path, barrier, results):
    lease = Lease(path, 30)
    barrier.wait()
    results.put(lease.acquire())


def test_of_many_processes_racing_for_a_free_or_expired_lease_exactly_one_wins(tmp_path):
    ctx = multiprocessing.get_context("fork")
    path = tmp_path / "l"
    for round_ in range(10):
        if round_ % 2:  # odd rounds race to take over an expired holder
            path.write_text(json.dumps({"host": "gone", "pid": 1, "token": "x", "expires_at": 0}))
        else:
            path.unlink(missing_ok=True)
        barrier, results = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(path, barrier, results)) for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        wins = [results.get(timeout=5) for _ in procs]
        assert wins.count(True) == 1, f"round {round_}: {wins}"
        assert not [n for n in os.listdir(tmp_path) if is_temporary(n)]


def test_a_holder_renews_on_a_full_filesystem(tmp_path, monkeypatch):
    clock = FakeClock(1_000_000.0)
    holder, other = Lease(tmp_path / "l", 30, clock=clock), Lease(tmp_path / "l", 30, clock=clock)
    assert holder.acquire()
    fill_filesystem(monkeypatch)
    for _ in range(3):  # 60 s: twice the TTL
        clock.now += 20
        assert holder.renew_if_due()
        assert not other.acquire()  # refused without trying to write
    assert read_lease(tmp_path / "l").expires_at == clock.now + 30


def test_a_holder_that_cannot_write_keeps_its_lease_until_it_expires(tmp_path, monkeypatch):
    clock = FakeClock(1_000_000.0)
    holder, other = Lease(tmp_path / "l", 30, clock=clock), Lease(tmp_path / "l", 30, clock=clock)
    assert holder.acquire()

    def no_space(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", no_space)  # e.g. a copy-on-write server, full
    clock.now += 20
    assert holder.renew_if_due() and holder.held
    assert not other.acquire()
    clock.now += 11
    with pytest.raises(OSError):
        holder.renew_if_due()
    assert not holder.held
    assert other.acquire()
