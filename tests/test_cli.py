"""The `lmcache-fs` command: every subcommand, --json, exit codes, and help for a new user."""

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cachedir import make_store, prefix_keys, record_bytes, save_prefix, set_mtime

from lmcache_fs.model_identity import model_identity
from lmcache_fs.ops import pins
from lmcache_fs.ops.cli import EXIT_BUSY, EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, main
from lmcache_fs.storage.layout import lease_path
from lmcache_fs.ops.lease import Lease
from lmcache_fs.ops.pins import PinStore
from lmcache_fs.progress import progress
from lmcache_fs.storage.quarantine import quarantine
from lmcache_fs.storage.usage import BudgetGuard, read_usage, write_usage

SCRIPT = Path(sys.executable).with_name("lmcache-fs")


@pytest.fixture
def cache(tmp_path):
    """A cache directory with one namespace holding two prompts of 3 chunks each."""
    store = make_store(tmp_path)
    save_prefix(store, prefix_keys("a", 3))
    save_prefix(store, prefix_keys("b", 3))
    return store


def run(capsys, *argv):
    """(exit code, parsed JSON output) of ``lmcache-fs ARGV --json``."""
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


def test_ls_lists_namespaces_with_model_chunks_bytes_and_last_use(capsys, cache, tmp_path):
    code, data = run(capsys, "ls", "--storage-path", str(tmp_path))
    [ns] = data["namespaces"]
    assert code == EXIT_OK
    assert ns["name"] == cache.layout.namespace.name and ns["model"] == "tiny@0123456789ab"
    assert ns["chunks"] == 6 and ns["bytes"] == 6 * (4096 + 1024) and ns["last_used"]


def test_ls_prints_a_table_for_people(capsys, cache, tmp_path):
    assert main(["--storage-path", str(tmp_path), "ls"]) == EXIT_OK
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["NAMESPACE", "MODEL", "CHUNKS"] and "31 KB" in row


def test_inspect_by_key_shows_the_header_and_who_pins_it(capsys, cache, tmp_path):
    keys = prefix_keys("a", 3)
    PinStore(cache.layout.directory).pin(keys)
    code, data = run(capsys, "inspect", keys[1], "--verify", "--storage-path", str(tmp_path))
    [info] = data["files"]
    assert code == EXIT_OK and info["verified"] == "data and checksum ok"
    assert info["shape"] == [2, 1, 1, 16, 16] and info["dtype"] == "bfloat16"
    assert info["metadata"]["parent_key"] == keys[0] and info["pinned_by"] == [keys[2]]


def test_inspect_flags_a_corrupt_file(capsys, cache, tmp_path):
    path = cache.layout.chunk_path(prefix_keys("a", 1)[0])
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(raw)
    code, data = run(capsys, "inspect", str(path), "--verify", "--storage-path", str(tmp_path))
    assert code == EXIT_PROBLEMS and "checksum" in data["files"][0]["problem"]


def test_inspect_verifies_a_quarantined_file_against_its_own_namespace(capsys, cache, tmp_path):
    keys = prefix_keys("a", 2)
    PinStore(cache.layout.directory).pin(keys)
    moved = quarantine(tmp_path, cache.layout.chunk_path(keys[1]), "test")
    code, data = run(capsys, "inspect", str(moved), "--verify", "--storage-path", str(tmp_path))
    [info] = data["files"]
    assert code == EXIT_OK and info["verified"] == "data and checksum ok"
    assert info["pinned_by"] == [keys[1]]


def test_inspect_of_an_unknown_key_is_exit_1(capsys, cache, tmp_path):
    assert run(capsys, "inspect", "ef" * 32, "--storage-path", str(tmp_path))[0] == EXIT_PROBLEMS


def test_verify_reports_bad_files_and_quarantine_leaves_a_clean_cache(capsys, cache, tmp_path):
    bad = cache.layout.chunk_path(prefix_keys("b", 3)[2])
    bad.write_bytes(bad.read_bytes()[:-10])
    cache.layout.chunk_path("ab" * 32).parent.mkdir(exist_ok=True)
    os.symlink("/etc/passwd", cache.layout.chunk_path("ab" * 32))
    code, data = run(capsys, "verify", "--storage-path", str(tmp_path))
    assert code == EXIT_PROBLEMS and data["checked"] == 6
    assert sorted(Path(f["path"]).name[:2] for f in data["bad"]) == sorted([bad.name[:2], "ab"])
    code, data = run(capsys, "verify", "--quarantine", "--storage-path", str(tmp_path))
    assert {f["action"] for f in data["bad"]} == {"quarantined"}
    assert run(capsys, "verify", "--storage-path", str(tmp_path)) == (
        EXIT_OK, {"checked": 5, "bad": [], "unreadable": []})
    assert len(os.listdir(tmp_path / "quarantine")) == 2


def test_verify_reports_a_symlinked_fan_out_directory_without_entering_it(capsys, cache, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, cache.layout.directory / "ff")
    code, data = run(capsys, "verify", "--quarantine", "--storage-path", str(tmp_path))
    assert code == EXIT_PROBLEMS and [Path(f["path"]).name for f in data["bad"]] == ["ff"]
    assert outside.is_dir() and not (cache.layout.directory / "ff").exists()


def test_verify_delete_removes_bad_files(capsys, cache, tmp_path):
    bad = cache.layout.chunk_path(prefix_keys("a", 1)[0])
    bad.write_bytes(b"")
    code, data = run(capsys, "verify", "--delete", "--storage-path", str(tmp_path))
    assert code == EXIT_PROBLEMS and data["bad"][0]["action"] == "deleted" and not bad.exists()


@pytest.mark.parametrize("error,action", [(errno.EIO, "--delete"), (errno.ESTALE, "--quarantine"),
                                          (errno.EACCES, "--quarantine")])
def test_verify_leaves_a_file_it_cannot_read_in_place(capsys, cache, tmp_path, monkeypatch,
                                                      error, action):
    # A soft NFS mount timing out, a stale handle, or an operator who is not the
    # engines' user: the chunk may be good, so only a damaged one is acted on.
    unreadable = cache.layout.chunk_path(prefix_keys("a", 3)[1])
    damaged = cache.layout.chunk_path(prefix_keys("b", 1)[0])
    damaged.write_bytes(b"")
    real_open = os.open

    def failing_open(path, *args, **kwargs):
        if os.fspath(path) == unreadable.name:  # the file, opened relative to its directory
            raise OSError(error, os.strerror(error), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    code = main(["verify", action, "--storage-path", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == EXIT_PROBLEMS and unreadable.exists() and not damaged.exists()
    assert f"{unreadable}: cannot open: {os.strerror(error)} (unreadable, left in place)" in out
    assert "1 bad" in out and "1 unreadable, left in place" in out
    code, data = run(capsys, "verify", "--storage-path", str(tmp_path))
    assert code == EXIT_PROBLEMS and data["bad"] == []
    assert data["unreadable"] == [{"path": str(unreadable),
                                   "problem": f"cannot open: {os.strerror(error)}"}]


def test_gc_evicts_the_least_recently_used_down_to_the_budget(capsys, cache, tmp_path):
    for i, key in enumerate(prefix_keys("a", 3) + prefix_keys("b", 3)):
        set_mtime(cache.layout.chunk_path(key), time.time() - 1000 + i)
    code, report = run(capsys, "gc", "--max-disk-size-gb", str(3 * 5120 / 1e9),
                       "--storage-path", str(tmp_path))
    assert code == EXIT_OK and report["evicted_chunks"] == 4  # down to 85% of 3 chunks
    assert [k for k in prefix_keys("b", 3) if cache.layout.chunk_path(k).exists()] == prefix_keys("b", 3)[1:]
    assert not lease_path(tmp_path).exists()  # a one-shot pass gives the lease back


def test_gc_exits_3_while_another_process_holds_the_eviction_lease(capsys, cache, tmp_path):
    Lease(lease_path(tmp_path), 60).acquire()
    code, report = run(capsys, "gc", "--max-disk-size-gb", "1", "--storage-path", str(tmp_path))
    assert code == EXIT_BUSY and not report["ran"] and f"pid {os.getpid()}" in report["lease_holder"]


def test_gc_daemon_without_a_budget_says_it_only_removes_temporaries(cache, tmp_path):
    daemon = subprocess.Popen([str(SCRIPT), "gc", "--daemon", "--json", "--eviction-interval-s",
                               "0.2", "--storage-path", str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    report = json.loads(daemon.stdout.readline())
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == EXIT_OK
    assert "only removes old temporaries" in daemon.stderr.read()
    assert report["evicted_chunks"] == 0 and not lease_path(tmp_path).exists()  # never took it


def test_gc_daemon_keeps_passing_until_sigterm(cache, tmp_path):
    daemon = subprocess.Popen([str(SCRIPT), "gc", "--daemon", "--json", "--eviction-interval-s",
                               "0.2", "--max-disk-size-gb", "0.000001", "--storage-path",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True)
    first = json.loads(daemon.stdout.readline())
    second = json.loads(daemon.stdout.readline())
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == EXIT_OK
    assert first["evicted_chunks"] == 6 and second["ran"] and second["evicted_chunks"] == 0
    assert not lease_path(tmp_path).exists()


def test_pin_by_key_pins_the_whole_prefix_and_unpin_removes_it(capsys, cache, tmp_path):
    keys = prefix_keys("a", 3)
    code, data = run(capsys, "pin", keys[2], "--note", "faq", "--storage-path", str(tmp_path))
    assert code == EXIT_OK and data["pins"][0] | {"namespace": None} == {
        "namespace": None, "name": keys[2], "chunks": 3, "present": 3, "new": True,
        "complete_prefix": True}
    code, data = run(capsys, "pin", "--list", "--storage-path", str(tmp_path))
    assert [(p["name"], p["note"], p["present"]) for p in data["pins"]] == [(keys[2], "faq", 3)]
    assert run(capsys, "unpin", keys[2], "--storage-path", str(tmp_path))[0] == EXIT_OK
    assert PinStore(cache.layout.directory).pins() == []


def test_unpinning_a_chunk_inside_a_pin_names_the_pin_to_remove(capsys, cache, tmp_path):
    keys = prefix_keys("a", 3)
    main(["pin", keys[2], "--storage-path", str(tmp_path)])
    capsys.readouterr()
    assert main(["unpin", keys[0], "--storage-path", str(tmp_path)]) == EXIT_PROBLEMS
    assert f"part of pin(s) {keys[2][:16]}" in capsys.readouterr().out


def test_pin_prompt_with_a_mistyped_model_folder_names_the_fix(capsys, cache, tmp_path):
    code, data = run(capsys, "pin", "--prompt", "hello", "--model", str(tmp_path / "tiny-lama"),
                     "--storage-path", str(tmp_path))
    assert code == EXIT_USAGE and data["error"] == (
        f"--model {tmp_path / 'tiny-lama'} is not a folder: pass the model folder or hub id "
        "the engines serve")


def test_pin_prompt_with_a_folder_without_a_tokenizer_names_the_fix(capsys, cache, tmp_path):
    code, data = run(capsys, "pin", "--prompt", "hello", "--model", str(tmp_path),
                     "--namespace", cache.layout.namespace.name, "--storage-path", str(tmp_path))
    assert code == EXIT_USAGE and data["error"].startswith(f"--model {tmp_path}: cannot load its tokenizer")
    assert "pass the model folder or hub id the engines serve" in data["error"]


def test_pin_prompt_in_a_randomly_seeded_namespace_asks_for_pythonhashseed(
        capsys, tmp_path, monkeypatch, synthetic_model):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    store = make_store(tmp_path, model=model_identity(str(synthetic_model), None), hash_algo="xxhash")
    code, data = run(capsys, "pin", "--prompt", "hello " * 40, "--model", str(synthetic_model),
                     "--storage-path", str(tmp_path))
    assert code == EXIT_USAGE and data["error"] == (
        f"namespace {store.layout.namespace.name}: hash algorithm xxhash is seeded at random "
        "unless PYTHONHASHSEED is set: set it to the engines' value")
    assert PinStore(store.layout.directory).pins() == []


def test_a_pin_too_large_to_read_back_is_exit_2_with_the_fix(capsys, cache, tmp_path, monkeypatch):
    monkeypatch.setattr(pins, "_MAX_PIN_FILE", 100)  # as a 16 MiB pin would be, in 3 keys
    code, data = run(capsys, "pin", prefix_keys("a", 3)[2], "--storage-path", str(tmp_path))
    assert code == EXIT_USAGE and "pin a shorter prefix" in data["error"]
    assert PinStore(cache.layout.directory).pins() == []


def test_pin_of_a_key_no_namespace_holds_is_exit_1(capsys, cache, tmp_path):
    assert run(capsys, "pin", "ef" * 32, "--storage-path", str(tmp_path))[0] == EXIT_PROBLEMS


def test_clear_asks_for_confirmation_and_refuses_without_a_terminal(capsys, cache, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, data = run(capsys, "clear", "--all", "--storage-path", str(tmp_path))
    assert code == EXIT_USAGE and "pass --yes" in data["error"] and "6 chunk files" in data["error"]
    assert len(list(cache.layout.directory.glob("*/*.safetensors"))) == 6


def test_clear_one_namespace_deletes_its_chunks_and_pins_and_keeps_the_other(capsys, cache, tmp_path):
    other = make_store(tmp_path, model="other")
    save_prefix(other, prefix_keys("c", 2))
    PinStore(cache.layout.directory).pin(prefix_keys("a", 3))
    code, data = run(capsys, "clear", "--namespace", cache.layout.namespace.name[:20], "--yes",
                     "--storage-path", str(tmp_path))
    assert code == EXIT_OK and data == {"deleted_chunks": 6, "deleted_pins": 1}
    assert list(cache.layout.directory.glob("*/*.safetensors")) == []
    assert (cache.layout.directory / "namespace.json").exists()
    assert len(list(other.layout.directory.glob("*/*.safetensors"))) == 2


def test_clear_drops_the_last_passes_measure_so_writers_store_again(capsys, cache, tmp_path):
    write_usage(tmp_path, 10**12)  # "full", as measured before the clear
    assert not BudgetGuard(tmp_path, max_bytes=10**9).allows(1)
    code, _ = run(capsys, "clear", "--all", "--yes", "--storage-path", str(tmp_path))
    assert code == EXIT_OK and read_usage(tmp_path) is None
    assert BudgetGuard(tmp_path, max_bytes=10**9).allows(1)


def test_an_unknown_namespace_is_exit_2_and_lists_the_known_ones(capsys, cache, tmp_path):
    code, data = run(capsys, "verify", "--namespace", "nope", "--storage-path", str(tmp_path))
    assert code == EXIT_USAGE and cache.layout.namespace.name in data["error"]


def _refuse(monkeypatch, directory: Path) -> None:
    """Refuse ``directory`` (and what is below it) as the kernel does for another user:
    the tests run as root, who reads a 0700 directory anyway."""
    refused = str(directory)
    for name in ("scandir", "open"):
        real = getattr(os, name)

        def refusing(path, *args, real=real, **kwargs):
            by_name = path if isinstance(path, str) else None
            if by_name is not None and (by_name.startswith(refused) or (
                    kwargs.get("dir_fd") is not None and by_name == directory.name)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), by_name)
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, refusing)


@pytest.mark.parametrize("command", ["ls", "verify", "stats"])
def test_a_namespace_it_may_not_read_is_skipped_and_named_with_the_fix(
        capsys, cache, tmp_path, monkeypatch, command):
    # Without malice: an engine with umask 077 on a directory several accounts share.
    other = make_store(tmp_path, model="readable")
    save_prefix(other, prefix_keys("c", 2))
    _refuse(monkeypatch, cache.layout.directory)
    code = main([command, "--storage-path", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == (EXIT_OK if command == "stats" else EXIT_PROBLEMS)
    assert str(cache.layout.directory) in out
    assert "cannot read" in out or "cannot be read" in out
    if command == "ls":
        assert other.layout.namespace.name in out  # the rest is listed


def test_one_unreadable_namespace_does_not_stop_eviction_of_the_others(
        capsys, cache, tmp_path, monkeypatch):
    other = make_store(tmp_path, model="readable")
    keys = prefix_keys("c", 4)
    save_prefix(other, keys)
    _refuse(monkeypatch, cache.layout.directory)
    code, data = run(capsys, "gc", "--storage-path", str(tmp_path),
                     "--max-disk-size-gb", str(2 * (4096 + 1024) / 1e9))
    assert code == EXIT_OK and data["unreadable_entries"] == 1
    assert data["evicted_chunks"] >= 2
    assert sum(other.layout.chunk_path(k).exists() for k in keys) <= 2


@pytest.mark.parametrize("content,message", [
    ("max_disk_size_gb: [1\n", "is not valid YAML at line 3, column 1"),
    ("max_disk_size_gb: .inf\n", "max_disk_size_gb must be a finite number"),
    ("file_mode: 644\n", 'write it as a quoted octal string, e.g. "0644"'),
])
def test_a_bad_config_file_is_exit_2_with_the_fix(capsys, tmp_path, content, message):
    config = tmp_path / "lmcache.yaml"
    config.write_text(f"storage_path: {tmp_path}\n{content}")
    code, data = run(capsys, "stats", "--config", str(config))
    assert code == EXIT_USAGE and message in data["error"]


def test_an_empty_storage_path_in_the_config_file_asks_for_one(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lmcache.yaml").write_text("storage_path:\n")
    code, data = run(capsys, "gc", "--config", "lmcache.yaml")
    assert code == EXIT_USAGE and data["error"].startswith("storage_path is required")
    assert not (tmp_path / "None").exists()


def test_stats_reads_the_budget_from_the_engines_config_file(capsys, cache, tmp_path):
    config = tmp_path / "lmcache.yaml"
    config.write_text(f"storage_path: {tmp_path}\nmax_disk_size_gb: 0.0001\n")
    (cache.layout.chunk_path(prefix_keys("a", 1)[0]).parent / ".tmp.h.1.x.y").write_bytes(b"x")
    code, data = run(capsys, "stats", "--config", str(config))
    assert code == EXIT_OK
    assert data["chunks"] == 6 and data["budget_bytes"] == 100_000
    # the chunks, the temporary, the namespace's records and the config file (a foreign file,
    # since the test put it in the cache directory): every byte under the directory counts
    used = 6 * 5120 + 1 + record_bytes(tmp_path) + config.stat().st_size
    assert data["budget_used"] == pytest.approx(used / 100_000)
    assert data["foreign"] == 1 and data["foreign_bytes"] == config.stat().st_size
    assert data["temporaries"] == 1 and data["evictor"] is None
    assert data["filesystem_free_bytes"] > 0 and data["stores_paused"] is False
    assert data["last_pass_bytes"] is None


def test_stats_says_what_the_last_pass_measured_for_the_writers(capsys, cache, tmp_path):
    code, _ = run(capsys, "gc", "--storage-path", str(tmp_path), "--max-disk-size-gb", "1")
    assert code == EXIT_OK
    code, data = run(capsys, "stats", "--storage-path", str(tmp_path))
    measured = 6 * 5120 + record_bytes(tmp_path)
    assert code == EXIT_OK and data["last_pass_bytes"] == measured
    assert read_usage(tmp_path) == (measured, 10**9)
    main(["stats", "--storage-path", str(tmp_path)])
    assert "last pass measured 31 KB" in capsys.readouterr().out


def test_without_a_storage_path_it_says_how_to_give_one(capsys, monkeypatch):
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    assert main(["ls"]) == EXIT_USAGE
    assert "--storage-path" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["", "ls", "inspect", "verify", "gc", "pin", "unpin", "clear", "stats"])
def test_every_command_has_help(command):
    done = subprocess.run([str(SCRIPT), *command.split(), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--json" in done.stdout
    if not command:
        assert "exit codes" in done.stdout


def test_progress_is_drawn_on_a_terminal_only():
    shown, hidden = io.StringIO(), io.StringIO()
    for stream, enabled in ((shown, True), (hidden, False)):
        with progress("verify", total=2, stream=stream, enabled=enabled) as bar:
            bar.update(2)
    assert "verify: 100%" in shown.getvalue() and "2/2" in shown.getvalue()
    assert hidden.getvalue() == "" and bar.n == 2  # counted even when hidden



def test_verify_survives_a_planted_header_declaring_a_huge_tensor(capsys, tmp_path):
    # Issue #17: in a namespace without a manifest (no known geometry), verify used to
    # allocate the header's declared shape before checking the file's size: a 4 KiB file
    # declaring [2**44] bytes crashed it. The size is now checked first.
    import json
    import struct

    from lmcache_fs.storage.layout import ChunkLayout, Namespace

    layout = ChunkLayout(tmp_path, Namespace({"model": "no-manifest"}))
    key = prefix_keys("huge", 1)[0]
    path = layout.chunk_path(key)
    path.parent.mkdir(parents=True)
    header = json.dumps({"__metadata__": {"format": "lmcache-fs", "format_version": "1",
                                          "namespace": layout.namespace.name, "key": key},
                         "kv": {"dtype": "U8", "shape": [2 ** 44],
                                "data_offsets": [0, 2 ** 44]}}).encode()
    path.write_bytes(struct.pack("<Q", 4088) + header.ljust(4088))
    code, data = run(capsys, "verify", "--storage-path", str(tmp_path))
    assert code == EXIT_PROBLEMS
    assert [(b["path"], "size" in b["problem"]) for b in data["bad"]] == [(str(path), True)]


def test_version_is_printed_and_exits_0():
    done = subprocess.run([str(SCRIPT), "--version"], capture_output=True, text=True, check=False)
    from lmcache_fs import __version__
    assert done.returncode == EXIT_OK and done.stdout.strip() == f"lmcache-fs {__version__}"


def test_the_storage_path_can_come_from_the_environment(capsys, cache, tmp_path, monkeypatch):
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    monkeypatch.setenv("LMCACHE_FS_STORAGE_PATH", str(tmp_path))
    code, data = run(capsys, "ls")
    assert code == EXIT_OK and data["storage_path"] == str(tmp_path)
    # --storage-path still wins over the environment.
    code, data = run(capsys, "ls", "--storage-path", str(tmp_path / "nowhere"))
    assert code == EXIT_USAGE and "nowhere" in data["error"]


# -- bad settings and hostile names: exit 2 with the fix, never a traceback ------------------

def test_a_metrics_port_beyond_65535_is_exit_2_naming_the_range(capsys, cache, tmp_path):
    # Guards against OverflowError from bind() with a traceback.
    with pytest.raises(SystemExit) as exited:
        main(["gc", "--daemon", "--metrics-port", "99999", "--storage-path", str(tmp_path)])
    assert exited.value.code == EXIT_USAGE
    assert "--metrics-port: '99999' is not a TCP port: give 0 to 65535" in capsys.readouterr().err


def test_a_gc_daemon_interval_beyond_a_day_is_exit_2_before_any_pass(capsys, cache, tmp_path):
    # Guards against the daemon passing once, then dying of OverflowError in its wait.
    code, data = run(capsys, "gc", "--daemon", "--eviction-interval-s", "1e10",
                     "--storage-path", str(tmp_path))
    assert code == EXIT_USAGE and data["error"].startswith("eviction_interval_s must be at most 86400")


def test_pin_prompt_on_a_manifest_with_block_size_0_is_exit_2(capsys, tmp_path, synthetic_model):
    # Guards against ZeroDivisionError from a planted (or damaged) namespace.json.
    store = make_store(tmp_path, model=model_identity(str(synthetic_model), None), block_size=0)
    code, data = run(capsys, "pin", "--prompt", "hello " * 40, "--model", str(synthetic_model),
                     "--storage-path", str(tmp_path))
    assert code == EXIT_USAGE and data["error"] == (
        f"{store.layout.directory}/namespace.json has no positive whole chunk_size and "
        "block_size (chunk_size 16, block_size 0); pin by key instead")


def test_a_storage_path_the_terminal_cannot_encode_is_printed_escaped(tmp_path):
    # Guards against UnicodeEncodeError: a directory name of bytes that are not UTF-8,
    # printed to a strict UTF-8 stdout.
    odd = os.fsdecode(os.fsencode(tmp_path) + b"/kv-\xff")
    os.mkdir(odd)
    done = subprocess.run([str(SCRIPT), "ls", "--storage-path", odd], capture_output=True,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert done.returncode == EXIT_OK, done.stderr.decode(errors="replace")[-500:]
    assert done.stdout.strip() == b"no namespaces under " + os.fsencode(tmp_path) + b"/kv-\\udcff"
