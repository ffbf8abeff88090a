"""The budget between eviction passes: the pass shares what it measured, writers stop at the budget."""

import json
import logging
import os

import pytest
from cachedir import FakeClock, chunk, make_store, prefix_keys, record_bytes
from test_eviction import CHUNK_BYTES

from lmcache_fs.ops.eviction import Evictor
from lmcache_fs.ops.inventory import scan_directory
from lmcache_fs.storage.layout import usage_path
from lmcache_fs.storage.usage import BudgetGuard, read_usage, write_usage
from lmcache_fs.storage.writer import BackgroundWriter


def _directory_bytes(root):
    """What a pass would measure: the chunks and the namespaces' records."""
    return scan_directory(root).bytes


def _store_all(writer, keys):
    for key in keys:
        writer.submit(key, chunk(key), {})
    writer.flush()


def test_a_guard_counts_its_stores_from_the_last_measure_and_stops_at_the_budget(tmp_path):
    write_usage(tmp_path, 900)
    guard = BudgetGuard(tmp_path, max_bytes=1000)
    assert guard.allows(60) and not guard.allows(60)  # 960, then 1020 would pass 1000
    assert guard.allows(40) and not guard.allows(1)   # exactly at the budget


def test_a_new_pass_restarts_the_count(tmp_path):
    clock = FakeClock()
    write_usage(tmp_path, 900)
    guard = BudgetGuard(tmp_path, max_bytes=1000, clock=clock)
    assert guard.allows(100) and not guard.allows(100)
    write_usage(tmp_path, 500)
    assert not guard.allows(100)  # looked at once a second at most
    clock.now = 1.0
    assert guard.allows(400) and not guard.allows(200)


def test_without_a_measure_or_a_budget_every_store_is_allowed(tmp_path):
    assert BudgetGuard(tmp_path, max_bytes=1000).allows(10**12)
    write_usage(tmp_path, 10**12)
    assert BudgetGuard(tmp_path, max_bytes=0).allows(10**12)


def test_a_removed_usage_file_forgets_the_measure(tmp_path):
    """``lmcache-fs clear`` removes it: stores go on until the next pass measures."""
    clock = FakeClock()
    write_usage(tmp_path, 1000)
    guard = BudgetGuard(tmp_path, max_bytes=1000, clock=clock)
    assert not guard.allows(1)
    usage_path(tmp_path).unlink()
    clock.now = 1.0
    assert guard.allows(10**6)


@pytest.mark.parametrize("content", [b"not json", b"[1, 2]", b'{"directory_bytes": -5}',
                                     b'{"directory_bytes": 1.5e9}', b'{"directory_bytes": true}',
                                     b'{"directory_bytes": "9"}', b"{" * 5000])
def test_a_planted_usage_file_is_ignored(tmp_path, content):
    clock = FakeClock()
    write_usage(tmp_path, 990)
    guard = BudgetGuard(tmp_path, max_bytes=1000, clock=clock)
    assert not guard.allows(20)
    usage_path(tmp_path).write_bytes(content)
    clock.now = 1.0
    assert read_usage(tmp_path) is None
    assert not guard.allows(20)  # the last real measure still holds
    assert guard.allows(10)


def test_a_usage_file_planted_as_a_symlink_is_not_followed(tmp_path):
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"directory_bytes": 10**15}))
    usage_path(tmp_path).symlink_to(target)
    assert read_usage(tmp_path) is None and BudgetGuard(tmp_path, 1000).allows(500)


def test_a_budgeted_pass_shares_what_the_directory_holds_after_it(tmp_path):
    store = make_store(tmp_path)
    for key in prefix_keys("p", 10):
        store.save(key, chunk(key), {})
    budget = 8 * CHUNK_BYTES + 2 * record_bytes(tmp_path)  # half of it: 4 chunks and the records
    report = Evictor(tmp_path, max_bytes=budget, low_watermark=0.5).run_pass()
    assert report.evicted_chunks == 6
    assert read_usage(tmp_path) == (report.bytes_after, budget)
    assert report.bytes_after == _directory_bytes(tmp_path)


def test_only_a_pass_that_ran_with_a_budget_shares_a_measure(tmp_path):
    make_store(tmp_path).save("ab" * 32, chunk("ab" * 32), {})
    Evictor(tmp_path, max_bytes=0).run_pass()
    assert not usage_path(tmp_path).exists()
    holder = Evictor(tmp_path, max_bytes=10**9)
    holder.run_pass()
    usage_path(tmp_path).unlink()
    assert not Evictor(tmp_path, max_bytes=10**9).run_pass().ran
    assert not usage_path(tmp_path).exists()


def test_writers_stop_at_the_budget_while_no_pass_runs(tmp_path, caplog):
    """The evicting engine was killed: until another takes the lease over, writers hold the line."""
    store = make_store(tmp_path)
    budget = 12 * CHUNK_BYTES + record_bytes(tmp_path)
    for key in prefix_keys("before", 4):
        store.save(key, chunk(key), {})
    assert Evictor(tmp_path, max_bytes=budget).run_pass().ran  # measures 4 chunks, then dies
    writer = BackgroundWriter(store, max_queue=64, guards=[BudgetGuard(tmp_path, budget)])
    with caplog.at_level(logging.WARNING, logger="lmcache_fs.storage.writer"):
        _store_all(writer, prefix_keys("after", 20))
    writer.close()
    assert writer.stats.published == 8 and writer.stats.skipped["budget"] == 12
    assert _directory_bytes(tmp_path) == budget
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "at its budget" in warnings[0]  # once a minute, not per store


def test_several_writers_overshoot_by_at_most_the_room_each_saw(tmp_path):
    stores = [make_store(tmp_path, tp_rank=rank) for rank in range(3)]
    records = record_bytes(tmp_path)
    budget, measured = 12 * CHUNK_BYTES + records, 8 * CHUNK_BYTES + records
    for key in prefix_keys("before", 8):
        stores[0].save(key, chunk(key), {})
    assert Evictor(tmp_path, max_bytes=budget, high_watermark=1.0, low_watermark=0.5
                   ).run_pass().bytes_after == measured
    for rank, store in enumerate(stores):
        writer = BackgroundWriter(store, max_queue=64, guards=[BudgetGuard(tmp_path, budget)])
        _store_all(writer, prefix_keys(f"writer {rank}", 10))
        writer.close()
        assert writer.stats.published == 4
    assert _directory_bytes(tmp_path) == measured + 3 * (budget - measured)


def test_the_next_pass_makes_room_and_stores_resume(tmp_path):
    clock = FakeClock()
    store = make_store(tmp_path)
    records = record_bytes(tmp_path)
    budget = 10 * CHUNK_BYTES + records
    evictor = Evictor(tmp_path, max_bytes=budget, low_watermark=0.5)
    evictor.run_pass()
    writer = BackgroundWriter(store, max_queue=64,
                              guards=[BudgetGuard(tmp_path, budget, clock=clock)])
    _store_all(writer, prefix_keys("first", 15))
    assert writer.stats.published == 10 and _directory_bytes(tmp_path) == budget
    evictor.run_pass()  # over the high watermark: down to half the budget
    kept = (budget // 2 - records) // CHUNK_BYTES
    clock.now = 1.0
    _store_all(writer, prefix_keys("second", 15))
    writer.close()
    assert writer.stats.published == 10 + (10 - kept) and _directory_bytes(tmp_path) == budget
    evictor.close()


def test_the_usage_file_is_replaced_whole(tmp_path, monkeypatch):
    """A failed write leaves the previous measure and no temporary behind."""
    write_usage(tmp_path, 123)

    def no_space(fd, data):
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(os, "write", no_space)
    with pytest.raises(OSError):
        write_usage(tmp_path, 456)
    monkeypatch.undo()
    assert read_usage(tmp_path).directory_bytes == 123
    assert [p.name for p in tmp_path.iterdir()] == [usage_path(tmp_path).name]


def test_the_groups_of_one_worker_share_one_count(tmp_path):
    """A hybrid model's KV cache groups each have a writer; one guard keeps their sum in budget."""
    stores = [make_store(tmp_path, kv_group=group) for group in range(3)]
    budget = 12 * CHUNK_BYTES + record_bytes(tmp_path)
    for key in prefix_keys("before", 4):
        stores[0].save(key, chunk(key), {})
    Evictor(tmp_path, max_bytes=budget, high_watermark=1.0, low_watermark=0.5).run_pass()
    guard = BudgetGuard(tmp_path, budget)
    writers = [BackgroundWriter(store, max_queue=64, guards=[guard]) for store in stores]
    for group, writer in enumerate(writers):  # all three threads write at once
        for key in prefix_keys(f"group {group}", 10):
            writer.submit(key, chunk(key), {})
    for writer in writers:
        writer.close()
    assert sum(w.stats.published for w in writers) == 8
    assert sum(w.stats.skipped["budget"] for w in writers) == 22
    assert _directory_bytes(tmp_path) == budget


def test_only_bytes_that_reach_the_disk_count(tmp_path, monkeypatch):
    """A chunk another instance stored first, a failed write, or a store another guard refused
    takes no room: the guard gives its count back."""
    budget = 4 * CHUNK_BYTES
    store = make_store(tmp_path)
    write_usage(tmp_path, 0)
    guard = BudgetGuard(tmp_path, budget)
    keys = prefix_keys("p", 4)
    for key in keys[:2]:  # stored by "another instance"
        store.save(key, chunk(key), {})
    writer = BackgroundWriter(store, max_queue=64, guards=[guard])
    _store_all(writer, keys)  # two already there, two new
    assert writer.stats.already_present == 2 and writer.stats.published == 2

    real_save = store.save
    monkeypatch.setattr(store, "save", lambda *a: (_ for _ in ()).throw(OSError(5, "EIO")))
    _store_all(writer, prefix_keys("q", 3))
    assert writer.stats.failed == 3
    monkeypatch.setattr(store, "save", real_save)

    class Refuses:
        reason = "refuses"

        def allows(self, nbytes):
            return False

        def refund(self, nbytes):
            raise AssertionError("nothing was counted here")

        def why_paused(self):
            return "a guard after the budget's says no"

    refused = BackgroundWriter(store, max_queue=64, guards=[guard, Refuses()])
    _store_all(refused, prefix_keys("r", 3))
    refused.close()
    assert refused.stats.skipped["refuses"] == 3
    _store_all(writer, prefix_keys("s", 5))  # room for exactly two more
    writer.close()
    assert writer.stats.published == 4 and writer.stats.skipped["budget"] == 3
    # the two planted first, and the records (the usage was written by hand, not measured)
    assert _directory_bytes(tmp_path) == budget + 2 * CHUNK_BYTES + record_bytes(tmp_path)


def test_the_usage_file_gets_the_configured_mode_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_usage(tmp_path, 1, mode=0o664)
    finally:
        os.umask(old)
    assert usage_path(tmp_path).stat().st_mode & 0o777 == 0o664


def test_an_engine_without_a_budget_holds_the_one_the_pass_enforced(tmp_path):
    """Engines with max_disk_size_gb 0 beside a `gc --daemon` with a budget (README)."""
    write_usage(tmp_path, 900, budget_bytes=1000)
    assert BudgetGuard(tmp_path, max_bytes=0).allows(100)
    assert not BudgetGuard(tmp_path, max_bytes=0).allows(101)
    assert BudgetGuard(tmp_path, max_bytes=5000).allows(4000)  # its own budget wins
    write_usage(tmp_path, 900)  # a pass without a budget: nothing to hold
    assert BudgetGuard(tmp_path, max_bytes=0).allows(10**12)
