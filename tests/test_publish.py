"""Atomic publish: no partial file is ever visible, the first writer wins, nothing is left behind."""

import multiprocessing
import os
import stat

import pytest

from lmcache_fs.storage.publish import publish, replace


def _files(directory):
    return sorted(p.name for p in directory.iterdir())


def test_first_writer_wins_and_the_loser_leaves_nothing(tmp_path):
    target = tmp_path / "d" / "chunk"
    assert publish(target, lambda fd: os.write(fd, b"first")) is True
    assert publish(target, lambda fd: os.write(fd, b"second")) is False
    assert target.read_bytes() == b"first"
    assert _files(target.parent) == ["chunk"]


def test_directories_are_created_when_missing_and_only_then(tmp_path, monkeypatch):
    made = []
    real_mkdir = os.mkdir
    monkeypatch.setattr(os, "mkdir",
                        lambda path, *a, **kw: made.append(path) or real_mkdir(path, *a, **kw))
    assert publish(tmp_path / "a" / "b" / "one", lambda fd: os.write(fd, b"1"))
    assert {p.name for p in made} == {"a", "b"}
    first = len(made)
    assert publish(tmp_path / "a" / "b" / "two", lambda fd: os.write(fd, b"2"))
    assert len(made) == first, "a store into an existing directory must not mkdir (an NFS round trip)"
    for name in ("one", "two"):  # eviction removed the emptied directory: made again
        (tmp_path / "a" / "b" / name).unlink()
    (tmp_path / "a" / "b").rmdir()
    assert publish(tmp_path / "a" / "b" / "three", lambda fd: os.write(fd, b"3"))
    assert (tmp_path / "a" / "b" / "three").read_bytes() == b"3" and len(made) > first


def test_failed_write_removes_its_temporary(tmp_path):
    def fail(fd):
        os.write(fd, b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        publish(tmp_path / "chunk", fail)
    assert _files(tmp_path) == []


def test_mode_is_applied_exactly_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        publish(tmp_path / "chunk", lambda fd: os.write(fd, b"x"), mode=0o640)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "chunk").st_mode) == 0o640


def test_without_hard_links_replace_still_publishes_once(tmp_path, monkeypatch):
    def no_link(src, dst, **dir_fds):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    assert publish(tmp_path / "chunk", lambda fd: os.write(fd, b"a")) is True
    assert publish(tmp_path / "chunk", lambda fd: os.write(fd, b"b")) is False
    assert (tmp_path / "chunk").read_bytes() == b"a"
    assert _files(tmp_path) == ["chunk"]


def _race(target: str, payload: bytes, barrier) -> bool:
    barrier.wait()
    return publish(target, lambda fd: os.write(fd, payload * 100_000))


def test_racing_processes_publish_exactly_one_complete_file(tmp_path):
    target = str(tmp_path / "chunk")
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Manager().Barrier(4)
    with ctx.Pool(4) as pool:
        results = pool.starmap(_race, [(target, bytes([65 + i]), barrier) for i in range(4)])
    assert sum(results) == 1
    content = (tmp_path / "chunk").read_bytes()
    assert len(content) == 100_000 and len(set(content)) == 1
    assert _files(tmp_path) == ["chunk"]


def test_replace_puts_the_new_file_whole_and_never_writes_through_a_planted_link(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"theirs")
    (tmp_path / "record").symlink_to(target)
    replace(tmp_path / "record", lambda fd: os.write(fd, b"first"))
    replace(tmp_path / "record", lambda fd: os.write(fd, b"second"))
    record = tmp_path / "record"
    assert record.read_bytes() == b"second" and not record.is_symlink()
    assert target.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "record"]
