"""``lmcache-fs``: look after a shared KV cache directory.

Each command is a small function that returns a :class:`Result` (exit code,
data for ``--json``, text for people); :func:`main` parses arguments, finds
the storage path and prints. The work itself lives in the library modules
(inventory, verify, eviction, pins), which engines and tests use too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from lmcache_fs import __version__
from lmcache_fs.config import CONFIG_FILE_ENV, ConfigError, LMCacheFSConfig, load_config
from lmcache_fs.log import human_bytes, init_logging
from lmcache_fs.model_identity import model_identity
from lmcache_fs.ops.eviction import BackgroundEvictor, EvictionReport, Evictor
from lmcache_fs.ops.inventory import (
    FileEntry,
    NamespaceNotFoundError,
    find_namespace,
    namespace_dirs,
    scan_chunks,
    parts_below,
    remove_entry,
    scan_directory,
    scan_namespace,
    total_size,
)
from lmcache_fs.ops.lease import read_lease
from lmcache_fs.ops.pins import PinStore
from lmcache_fs.progress import progress, track
from lmcache_fs.storage.layout import (PINS_DIR, QUARANTINE_DIR, USAGE_NAME, BadKeyError,
                                       check_key, chunk_path, lease_path)
from lmcache_fs.storage.manifest import read_manifest
from lmcache_fs.storage.quarantine import quarantine
from lmcache_fs.storage.space import free_bytes
from lmcache_fs.storage.usage import read_usage

EXIT_OK = 0
EXIT_PROBLEMS = 1  # bad files found, nothing matched, or the user declined
EXIT_USAGE = 2     # bad arguments or configuration (argparse uses 2 as well)
EXIT_BUSY = 3      # another process holds the eviction lease

STORAGE_PATH_ENV = "LMCACHE_FS_STORAGE_PATH"

_EPILOG = f"""\
The storage path comes from --storage-path, else ${STORAGE_PATH_ENV}, else from
storage_path in the YAML file named by --config or ${CONFIG_FILE_ENV} (the engines'
file: the budget and watermarks are read from it too).

exit codes:
  0  success
  1  problems found (bad files, no matching chunk or namespace) or confirmation declined
  2  bad arguments or configuration, or a file this user cannot read or write
  3  another process holds the eviction lease (gc)

examples:
  lmcache-fs ls --storage-path /mnt/kv
  lmcache-fs verify --quarantine
  lmcache-fs gc --daemon --max-disk-size-gb 500 --metrics-port 9400
  lmcache-fs pin --model /models/llama --prompt-file system_prompt.txt --note "support bot"
  lmcache-fs stats --json
"""


@dataclass
class Result:
    """What a command prints: ``data`` with --json, ``text`` otherwise."""

    code: int
    data: dict[str, Any]
    text: list[str] = field(default_factory=list)


# -- formatting -------------------------------------------------------------------


def _ago(when: float | None) -> str:
    if when is None:
        return "never"
    seconds = max(0.0, time.time() - when)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _iso(when: float | None) -> str | None:
    return None if when is None else time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(when))


def _table(header: Sequence[str], rows: list[Sequence[Any]]) -> list[str]:
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def _namespaces(root: Path, name: str | None) -> list[Path]:
    return [find_namespace(root, name)] if name else namespace_dirs(root)


# -- commands ---------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace, cfg: LMCacheFSConfig) -> Result:
    """Namespaces with their model, chunk count, size and last use."""
    with progress("scan") as bar:
        contents = scan_directory(cfg.storage_path, bar.update)
    rows = contents.namespaces
    data = {"storage_path": cfg.storage_path,
            "namespaces": [{**asdict(s), "last_used": _iso(s.last_used)} for s in rows],
            "unreadable": [e.path for e in contents.unreadable]}
    text = _table(["NAMESPACE", "MODEL", "CHUNKS", "SIZE", "LAST USED", "PINS"],
                  [(s.name, s.model, s.chunks, human_bytes(s.bytes), _ago(s.last_used), s.pins)
                   for s in rows]) if rows else [f"no namespaces under {cfg.storage_path}"]
    text += _unreadable_text(contents.unreadable)
    return Result(EXIT_PROBLEMS if contents.unreadable else EXIT_OK, data, text)


def _unreadable_text(unreadable: Sequence[FileEntry]) -> list[str]:
    """A line naming what this user could not read, and the fix (nothing is failed for it)."""
    if not unreadable:
        return []
    shown = ", ".join(e.path for e in unreadable[:3]) + (", ..." if len(unreadable) > 3 else "")
    return [f"skipped {len(unreadable)} entries this user cannot read ({shown}): run as the "
            "engines' user or fix the permissions"]


def cmd_inspect(args: argparse.Namespace, cfg: LMCacheFSConfig) -> Result:
    """A chunk file's header and metadata, found by path or by key."""
    from lmcache_fs.ops.inspection import namespace_of, read_header
    from lmcache_fs.ops.verify import check_chunk
    from lmcache_fs.storage.codec import ChunkFileError

    root = Path(cfg.storage_path)
    if os.path.sep in args.target or os.path.lexists(args.target):
        paths = [Path(args.target)]
    else:
        check_key(args.target)
        paths = [chunk_path(ns, args.target) for ns in _namespaces(root, args.namespace)]
        paths = [p for p in paths if os.path.lexists(p)]
        if not paths:
            return Result(EXIT_PROBLEMS, {"files": []}, [f"no chunk {args.target} under {root}"])
    files, text, code = [], [], EXIT_OK
    for path in paths:
        info: dict[str, Any] = {"path": str(path)}
        try:
            st = os.lstat(path)
            info.update(size=st.st_size, last_used=_iso(st.st_mtime))
            header = read_header(path)
            info.update(dtype=str(header.dtype).removeprefix("torch."), shape=list(header.shape),
                        data_offset=header.data_offset, metadata=header.metadata)
            ns_dir = namespace_of(path)
            key = header.metadata.get("key", "")
            info["pinned_by"] = [p.name for p in PinStore(ns_dir).pins_holding(key)] if key else []
            if args.verify and (finding := check_chunk(path, ns_dir.name, key,
                                                       mac_key=cfg.integrity_key())) is not None:
                info["problem"] = finding.problem
            elif args.verify:
                info["verified"] = "data and checksum ok"
        except (OSError, ChunkFileError) as exc:
            info["problem"] = str(exc)
        if "problem" in info:
            code = EXIT_PROBLEMS
        files.append(info)
        text += [f"{k}: {v}" for k, v in info.items() if k != "metadata"]
        text += [f"  {k}: {v}" for k, v in info.get("metadata", {}).items()] + [""]
    return Result(code, {"files": files}, text[:-1])


def cmd_verify(args: argparse.Namespace, cfg: LMCacheFSConfig) -> Result:
    """Read every chunk file as the loader would; report, quarantine or delete bad ones.

    Only files proven damaged are moved or deleted. One that could not be read
    (EIO, ESTALE, EACCES) may be a good chunk behind a flaky mount or the wrong
    user: it is reported as unreadable and left in place.
    """
    from lmcache_fs.ops.verify import count_entries, verify_namespace

    root = Path(cfg.storage_path)
    action = "quarantined" if args.quarantine else "deleted" if args.delete else ""
    bad, unreadable, checked = [], [], 0
    for ns in _namespaces(root, args.namespace):
        with progress(f"verify {ns.name}", count_entries(ns)) as bar:
            for finding in verify_namespace(ns, bar.update, cfg.integrity_key()):
                entry = {"path": finding.path, "problem": finding.problem}
                if not finding.damaged:
                    unreadable.append(entry)
                    continue
                done = (quarantine(root, finding.path, finding.problem) is not None
                        if args.quarantine
                        else remove_entry(root, parts_below(root, finding.path)) if args.delete
                        else False)
                bad.append({**entry, "action": action if done else ""})
            checked += bar.n
    text = [f"{f['path']}: {f['problem']}" + (f" ({f['action']})" if f["action"] else "")
            for f in bad]
    text += [f"{f['path']}: {f['problem']} (unreadable, left in place)" for f in unreadable]
    text.append(f"checked {checked} chunk files: {len(bad)} bad"
                + (f", {action}" if action and bad else "")
                + (f"; {len(unreadable)} unreadable, left in place (fix the mount or run as the "
                   "engines' user, then verify again)" if unreadable else ""))
    return Result(EXIT_PROBLEMS if bad or unreadable else EXIT_OK,
                  {"checked": checked, "bad": bad, "unreadable": unreadable}, text)


def _report_text(report: EvictionReport) -> str:
    if not report.ran:
        return f"another process holds the eviction lease ({report.lease_holder}); it enforces the budget"
    budget = human_bytes(report.budget_bytes) if report.budget_bytes else "none"
    return (f"{human_bytes(report.bytes_before)} -> {human_bytes(report.bytes_after)} "
            f"(budget {budget}): evicted {report.evicted_chunks} chunks "
            f"({human_bytes(report.evicted_bytes)}), removed {report.removed_quarantined} "
            f"quarantined and {report.removed_temporaries} stale temporary files, "
            f"kept {report.skipped_pinned} pinned and {report.skipped_recently_used} just used"
            + _foreign_text(report))


def _foreign_text(report: EvictionReport) -> str:
    parts = []
    if report.removed_foreign:
        parts.append(f"removed {report.removed_foreign} foreign entries")
    if report.foreign_files:
        parts.append(f"{report.foreign_files} foreign entries ({human_bytes(report.foreign_bytes)}) "
                     "counted, not removed (--remove-foreign removes them)")
    if report.unreadable_entries:
        parts.append(f"{report.unreadable_entries} entries this user cannot read, skipped")
    return "".join(f"; {p}" for p in parts)


def cmd_gc(args: argparse.Namespace, cfg: LMCacheFSConfig) -> Result:
    """One eviction pass (or, with --daemon, one every interval until SIGTERM/SIGINT)."""
    evictor = Evictor.from_config(cfg, remove_foreign=args.remove_foreign)
    if args.metrics_port is not None and not args.daemon:
        raise ConfigError("--metrics-port serves the daemon's metrics: add --daemon")
    if not args.daemon:
        try:
            report = evictor.run_pass()
        finally:
            evictor.close()
        return Result(EXIT_OK if report.ran else EXIT_BUSY, asdict(report), [_report_text(report)])

    metrics = server = None
    if args.metrics_port is not None:
        from lmcache_fs.ops.exporter import DirectoryMetrics

        metrics = DirectoryMetrics(cfg, evictor)
        server = metrics.serve(args.metrics_host, args.metrics_port)

    def on_report(report: EvictionReport) -> None:
        if metrics is not None:
            metrics.observe(report)
        line = json.dumps(asdict(report)) if args.json else _report_text(report)
        print(line, flush=True)

    if cfg.max_disk_size_gb == 0:  # stderr: --json output stays one report per line
        print("lmcache-fs gc: no max_disk_size_gb, so this daemon only removes old temporaries; "
              "pass --max-disk-size-gb (or set it in the config file) to evict", file=sys.stderr)
    daemon = BackgroundEvictor(evictor, cfg.eviction_interval_s, on_report=on_report)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop())
    try:
        daemon.run_until_stopped()
    finally:
        if server is not None:
            server.close()
    return Result(EXIT_OK, {}, [])


def _prompt_namespaces(args: argparse.Namespace, root: Path) -> list[Path]:
    if args.namespace:
        return [find_namespace(root, args.namespace)]
    identity = model_identity(args.model, None)
    return [ns for ns in namespace_dirs(root) if (read_manifest(ns) or {}).get("model") == identity]


def _prompt_keys(args: argparse.Namespace, ns: Path) -> list[str]:
    from lmcache_fs.connector.prompt_keys import chunk_keys, tokenize

    manifest = read_manifest(ns) or {}
    chunk_size, block_size = manifest.get("chunk_size"), manifest.get("block_size")
    # namespace.json is in the shared directory: anyone who can write it may plant zeros.
    if not all(type(n) is int and n > 0 for n in (chunk_size, block_size)):
        raise ConfigError(f"{ns}/namespace.json has no positive whole chunk_size and block_size "
                          f"(chunk_size {chunk_size!r}, block_size {block_size!r}); pin by key "
                          "instead")
    try:
        text = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text()
    except OSError as exc:
        raise ConfigError(f"--prompt-file {args.prompt_file}: {exc.strerror}") from exc
    try:
        tokens = tokenize(args.model, text, not args.no_special_tokens)
    except (OSError, ValueError) as exc:  # transformers: no such hub id, no tokenizer files
        raise ConfigError(f"--model {args.model}: cannot load its tokenizer "
                          f"({str(exc).splitlines()[0]}): pass the model folder or hub id the "
                          "engines serve (a hub id must be in the local Hugging Face cache "
                          "without network access)") from exc
    try:
        return chunk_keys(tokens, chunk_size, block_size, str(manifest.get("hash_algo", "sha256")))
    except ValueError as exc:  # its message names the fix (e.g. set PYTHONHASHSEED)
        raise ConfigError(f"namespace {ns.name}: {exc}") from exc


def _targets(args: argparse.Namespace, root: Path) -> list[tuple[Path, list[str], bool]]:
    """``(namespace, prefix keys, complete)`` for each namespace the pin/unpin arguments name."""
    from lmcache_fs.ops.inspection import prefix_keys
    from lmcache_fs.storage.codec import ChunkFileError

    if args.prompt is not None or args.prompt_file:
        if not args.model:
            raise ConfigError("--model is required with --prompt/--prompt-file (the model folder "
                              "or hub id the engines serve)")
        # A mistyped folder would otherwise match no namespace ("nothing pinned"), or
        # reach transformers, which takes it for a hub id and tries the network.
        if args.model.startswith(("/", ".")) and not Path(args.model).is_dir():
            raise ConfigError(f"--model {args.model} is not a folder: pass the model folder "
                              "or hub id the engines serve")
        return [(ns, keys, True) for ns in _prompt_namespaces(args, root)
                if (keys := _prompt_keys(args, ns))]
    targets = []
    for key in args.keys:
        check_key(key)
        for ns in _namespaces(root, args.namespace):
            if args.command == "unpin":
                targets.append((ns, [key], True))
                continue
            try:
                keys, complete = prefix_keys(ns, key)
            except ChunkFileError:
                continue  # not stored in this namespace
            targets.append((ns, keys, complete))
    return targets


def cmd_pin(args: argparse.Namespace, cfg: LMCacheFSConfig) -> Result:
    """Pin prefixes (by chunk key or by prompt text) so that eviction never removes them."""
    root = Path(cfg.storage_path)
    if args.list:
        pins = [{"namespace": ns.name, "name": p.name, "chunks": len(p.keys), "note": p.note,
                 "pinned_at": _iso(p.pinned_at), "host": p.host,
                 "present": sum(os.path.exists(chunk_path(ns, k)) for k in p.keys)}
                for ns in _namespaces(root, args.namespace) for p in PinStore(ns).pins()]
        return Result(EXIT_OK, {"pins": pins}, _table(
            ["NAMESPACE", "PIN", "CHUNKS", "PRESENT", "PINNED", "NOTE"],
            [(p["namespace"], p["name"][:16], p["chunks"], p["present"], p["pinned_at"], p["note"])
             for p in pins]) if pins else ["no pins"])
    if not args.keys and args.prompt is None and not args.prompt_file:
        raise ConfigError("name what to pin: chunk KEYs, --prompt TEXT or --prompt-file FILE "
                          "(with --model), or --list")
    done = []
    for ns, keys, complete in _targets(args, root):
        try:
            new = PinStore(ns, cfg.file_mode).pin(keys, args.note)
        except ValueError as exc:  # a pin too large to be read back: the message names the fix
            raise ConfigError(str(exc)) from exc
        present = sum(os.path.exists(chunk_path(ns, k)) for k in keys)
        done.append({"namespace": ns.name, "name": keys[-1], "chunks": len(keys),
                     "present": present, "new": new, "complete_prefix": complete})
    if not done:
        return Result(EXIT_PROBLEMS, {"pins": []}, [
            "nothing pinned: no namespace holds that key, or no namespace belongs to that model "
            "(check --model, and that PYTHONHASHSEED matches the engines'), or the prompt is "
            "shorter than one chunk"])
    text = [f"{'pinned' if d['new'] else 'already pinned'} {d['name'][:16]}… in {d['namespace']}: "
            f"{d['chunks']} chunks, {d['present']} stored"
            + ("" if d["complete_prefix"] else " (some earlier chunks are gone: pinned the rest)")
            for d in done]
    return Result(EXIT_OK, {"pins": done}, text)


def cmd_unpin(args: argparse.Namespace, cfg: LMCacheFSConfig) -> Result:
    """Remove pins (by the pin's name, i.e. its last chunk key, or by prompt text)."""
    if not args.keys and args.prompt is None and not args.prompt_file:
        raise ConfigError("name what to unpin: pin names (see `pin --list`), or --prompt/--prompt-file")
    removed, text = [], []
    for ns, keys, _ in _targets(args, Path(cfg.storage_path)):
        store = PinStore(ns, cfg.file_mode)
        if store.unpin(keys[-1]):
            removed.append({"namespace": ns.name, "name": keys[-1]})
            text.append(f"unpinned {keys[-1][:16]}… in {ns.name}")
        elif holders := store.pins_holding(keys[-1]):
            text.append(f"{keys[-1][:16]}… in {ns.name} is not a pin but part of pin(s) "
                        + ", ".join(p.name[:16] + "…" for p in holders) + ": unpin those")
    return Result(EXIT_OK if removed else EXIT_PROBLEMS, {"unpinned": removed},
                  text or ["no such pin"])


def cmd_clear(args: argparse.Namespace, cfg: LMCacheFSConfig) -> Result:
    """Delete the chunks, pins and temporaries of one namespace, or of all (then the quarantine too)."""
    root = Path(cfg.storage_path)
    if not args.all and not args.namespace:
        raise ConfigError("name what to clear: --namespace NAME (see `ls`) or --all")
    targets = _namespaces(root, None if args.all else args.namespace)
    chunks = [c for ns in targets for c in scan_chunks(ns)]
    pins = sum(len(PinStore(ns).pins()) for ns in targets)
    what = (f"{len(chunks)} chunk files ({human_bytes(total_size(chunks))}) and {pins} pins in "
            + ("all namespaces" if args.all else targets[0].name) + f" under {root}")
    if not args.yes:
        if not sys.stdin.isatty():
            raise ConfigError(f"clear would delete {what}: pass --yes to confirm (no terminal to ask)")
        if input(f"Delete {what}? [y/N] ").strip().lower() not in ("y", "yes"):
            return Result(EXIT_PROBLEMS, {"deleted_chunks": 0}, ["nothing deleted"])
    # By descriptor (ops/inventory.py): a planted symlink is removed itself, never followed.
    deleted = sum(remove_entry(root, chunk.parts) for chunk in track(chunks, "clear", len(chunks)))
    for ns in targets:
        remove_entry(root, (ns.name, PINS_DIR))
        for temp in scan_namespace(ns).temporaries:
            remove_entry(root, temp.parts)
    if args.all:
        remove_entry(root, (QUARANTINE_DIR,))
    # The last pass's measure no longer holds: writers store again until the next pass measures.
    remove_entry(root, (USAGE_NAME,))
    return Result(EXIT_OK, {"deleted_chunks": deleted, "deleted_pins": pins},
                  [f"deleted {deleted} chunk files and {pins} pins"])


def cmd_stats(args: argparse.Namespace, cfg: LMCacheFSConfig) -> Result:
    """Totals against the budget, free space, temporaries, quarantine and who is evicting."""
    root = Path(cfg.storage_path)
    with progress("scan") as bar:
        contents = scan_directory(root, bar.update)
    rows, temps, quarantined = contents.namespaces, contents.temporaries, contents.quarantined
    used = contents.bytes
    budget = int(cfg.max_disk_size_gb * 1e9)
    usage = shutil.disk_usage(root)
    free = free_bytes(root)
    holder = read_lease(lease_path(root))
    last_pass = read_usage(root)
    measured = last_pass.directory_bytes if last_pass else None
    data = {
        "storage_path": str(root), "namespaces": len(rows), "chunks": sum(r.chunks for r in rows),
        "bytes": used, "budget_bytes": budget, "budget_used": used / budget if budget else None,
        "high_watermark": cfg.eviction_high_watermark, "low_watermark": cfg.eviction_low_watermark,
        "pins": sum(r.pins for r in rows),
        "temporaries": len(temps), "temporary_bytes": total_size(temps),
        "quarantined": len(quarantined), "quarantined_bytes": total_size(quarantined),
        "foreign": len(contents.foreign), "foreign_bytes": total_size(contents.foreign),
        "unreadable": len(contents.unreadable),
        "filesystem_bytes": usage.total, "filesystem_free_bytes": free,
        "min_free_bytes": int(cfg.min_free_disk_gb * 1e9),
        "stores_paused": free < cfg.min_free_disk_gb * 1e9,
        "evictor": holder.describe(time.time()) if holder else None,
        "last_pass_bytes": measured,  # what writers count their stores from (the budget guard)
        "last_used": _iso(max((r.last_used for r in rows if r.last_used), default=None)),
    }
    budget_text = (f"{human_bytes(budget)} ({100 * used / budget:.0f}% used, evicts above "
                   f"{100 * cfg.eviction_high_watermark:.0f}% down to "
                   f"{100 * cfg.eviction_low_watermark:.0f}%)") if budget else "none (max_disk_size_gb = 0)"
    text = [
        f"storage path   {root}",
        f"namespaces     {data['namespaces']}, {data['chunks']} chunks, {data['pins']} pins, "
        f"last used {_ago(max((r.last_used for r in rows if r.last_used), default=None))}",
        f"size           {human_bytes(used)}",
        f"budget         {budget_text}",
        f"filesystem     {human_bytes(free)} free of {human_bytes(usage.total)}; stores "
        + ("PAUSED" if data["stores_paused"] else "allowed")
        + f" below {human_bytes(data['min_free_bytes'])} free",
        f"temporaries    {len(temps)} ({human_bytes(total_size(temps))})",
        f"quarantined    {len(quarantined)} ({human_bytes(total_size(quarantined))})",
        f"foreign        {len(contents.foreign)} ({human_bytes(total_size(contents.foreign))}), "
        "counted, never removed unless `gc --remove-foreign`",
        f"evictor        {data['evictor'] or 'none holds the lease'}; last pass measured "
        + (human_bytes(measured) if measured is not None else "nothing yet"),
        *_unreadable_text(contents.unreadable),
    ]
    return Result(EXIT_OK, data, text)


# -- arguments --------------------------------------------------------------------

_COMMANDS: dict[str, tuple[Callable[[argparse.Namespace, LMCacheFSConfig], Result], str]] = {
    "ls": (cmd_ls, "list namespaces: model, chunk count, size, last use"),
    "inspect": (cmd_inspect, "show a chunk file's header and metadata"),
    "verify": (cmd_verify, "check every chunk file; optionally quarantine or delete bad ones"),
    "gc": (cmd_gc, "run one eviction pass (or keep running with --daemon)"),
    "pin": (cmd_pin, "protect a prefix from eviction (by chunk key, or prompt text + model)"),
    "unpin": (cmd_unpin, "remove a pin"),
    "clear": (cmd_clear, "delete the cached chunks of one namespace or of all"),
    "stats": (cmd_stats, "totals, budget, free space, temporaries, quarantine, evictor"),
}


def _common(suppress: bool) -> argparse.ArgumentParser:
    # The same options before or after the command: after it, they only
    # override what was given before (argparse.SUPPRESS keeps the earlier value).
    default = argparse.SUPPRESS if suppress else None
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--storage-path", default=default, metavar="DIR",
                        help="the cache directory (overrides storage_path of the config file)")
    parser.add_argument("--config", default=default, metavar="FILE",
                        help=f"YAML settings file (default: ${CONFIG_FILE_ENV})")
    parser.add_argument("--json", action="store_true",
                        default=argparse.SUPPRESS if suppress else False,
                        help="print machine-readable JSON instead of text")
    return parser


def _pin_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("keys", nargs="*", metavar="KEY",
                     help="chunk key (64 hex digits, see `ls`/`inspect`); pin takes the whole "
                          "prefix ending at it")
    sub.add_argument("--prompt", metavar="TEXT", help="the prompt text whose chunks to select")
    sub.add_argument("--prompt-file", metavar="FILE", help="read the prompt text from FILE")
    sub.add_argument("--model", help="the model folder or hub id the engines serve "
                                     "(with --prompt; needs vLLM installed)")
    sub.add_argument("--no-special-tokens", action="store_true",
                     help="tokenize without BOS/special tokens (e.g. for chat-templated text)")
    sub.add_argument("--namespace", help="only this namespace (name or unique prefix)")


def _port(text: str) -> int:
    """A TCP port for argparse: 0 (pick a free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port: give 0 to 65535 "
                                         "(0 picks a free one)")
    return port


def build_parser() -> argparse.ArgumentParser:
    """The ``lmcache-fs`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="lmcache-fs", parents=[_common(False)], epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Inspect and maintain an lmcache-fs KV cache directory shared by vLLM engines.")
    parser.add_argument("--version", action="version", version=f"lmcache-fs {__version__}")
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {name: subs.add_parser(name, parents=[_common(True)], help=help_, description=help_)
               for name, (_, help_) in _COMMANDS.items()}

    parsers["inspect"].add_argument("target", metavar="PATH_OR_KEY",
                                    help="a chunk file path, or a chunk key")
    parsers["inspect"].add_argument("--namespace", help="look the key up only in this namespace")
    parsers["inspect"].add_argument("--verify", action="store_true",
                                    help="also read the data and check its checksum")

    verify = parsers["verify"]
    verify.add_argument("--namespace", help="only this namespace (name or unique prefix)")
    action = verify.add_mutually_exclusive_group()
    action.add_argument("--quarantine", action="store_true",
                        help="move bad files to <storage path>/quarantine/")
    action.add_argument("--delete", action="store_true", help="delete bad files")

    gc = parsers["gc"]
    gc.add_argument("--daemon", action="store_true",
                    help="keep running, one pass every --eviction-interval-s (for a sidecar)")
    gc.add_argument("--max-disk-size-gb", type=float, help="budget for the whole directory")
    gc.add_argument("--eviction-interval-s", type=float, help="seconds between passes (daemon)")
    gc.add_argument("--temp-file-grace-s", type=float,
                    help="remove writers' temporary files older than this (at least 60)")
    gc.add_argument("--remove-foreign", action="store_true",
                    help="also remove every entry the cache did not create (a file or directory "
                         "at a name it never uses, a symlink, FIFO or device): counted against "
                         "the budget and reported, but otherwise never removed")
    gc.add_argument("--metrics-port", type=_port, metavar="PORT",
                    help="with --daemon: serve Prometheus /metrics and /health on PORT "
                         "(default: off; 0 picks a free port)")
    gc.add_argument("--metrics-host", default="0.0.0.0", metavar="ADDR",
                    help="address for --metrics-port (default 0.0.0.0: kubelet probes the pod IP)")

    _pin_arguments(parsers["pin"])
    parsers["pin"].add_argument("--note", default="", help="why it is pinned (shown by --list)")
    parsers["pin"].add_argument("--list", action="store_true", help="list the pins")
    _pin_arguments(parsers["unpin"])

    clear = parsers["clear"]
    clear.add_argument("--namespace", help="the namespace to clear (name or unique prefix)")
    clear.add_argument("--all", action="store_true", help="clear every namespace and the quarantine")
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return parser


def _config(args: argparse.Namespace) -> LMCacheFSConfig:
    overrides: dict[str, Any] = {}
    if storage_path := args.storage_path or os.environ.get(STORAGE_PATH_ENV):
        overrides["storage_path"] = storage_path
    for key in ("max_disk_size_gb", "eviction_interval_s", "temp_file_grace_s"):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    if not args.config and not os.environ.get(CONFIG_FILE_ENV) and "storage_path" not in overrides:
        raise ConfigError(f"which cache? pass --storage-path DIR (or set ${STORAGE_PATH_ENV}), "
                          f"or --config FILE (or set ${CONFIG_FILE_ENV}) naming a file with "
                          "storage_path")
    cfg = load_config(overrides, config_file=args.config)
    if not Path(cfg.storage_path).is_dir():
        raise ConfigError(f"storage path {cfg.storage_path} is not a directory")
    return cfg


def _os_error_message(exc: OSError) -> str:
    """One line for an OS error no command handles itself (e.g. a cache directory of mode
    0700 owned by the engines' user), naming the path and, for permissions, the fix."""
    where = f" ({exc.filename})" if exc.filename else ""
    fix = (": run as the engines' user or fix the permissions"
           if isinstance(exc, PermissionError) else "")
    return f"error: {exc.strerror or exc}{where}{fix}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (see ``lmcache-fs --help``)."""
    for stream in (sys.stdout, sys.stderr):
        # A path need not be valid in the terminal's encoding (bytes that are not UTF-8
        # on a UTF-8 terminal): print it escaped, never fail on it.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    init_logging()
    try:
        cfg = _config(args)
        result = _COMMANDS[args.command][0](args, cfg)
    except (ConfigError, NamespaceNotFoundError, BadKeyError, OSError) as exc:
        message = _os_error_message(exc) if isinstance(exc, OSError) else str(exc)
        print(json.dumps({"error": message}) if args.json else f"lmcache-fs: {message}",
              file=sys.stdout if args.json else sys.stderr)
        return EXIT_USAGE
    if result.data or result.text:
        print(json.dumps(result.data, indent=2) if args.json else "\n".join(result.text))
    return result.code


if __name__ == "__main__":
    sys.exit(main())
