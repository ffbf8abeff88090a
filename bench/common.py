"""What every suite shares: options, the machine description, statistics, markdown.

Results are only comparable within one run on one machine, so every results
file starts with the machine, the versions and the exact command.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
WORK_DIR = REPO / ".cache" / "bench"


@dataclass(frozen=True)
class BenchOptions:
    """How a suite runs; the same object goes to every suite of one command."""

    quick: bool
    """Tiny sizes and one round: a smoke test of the code paths, not a measurement."""

    rounds: int
    """Interleaved repetitions of every competitor (medians are reported)."""

    results_dir: Path
    """Where the markdown tables and PNG plots go."""

    work_dir: Path
    """Scratch space on the filesystem under test (large files are removed after use)."""

    lmcache: bool
    """Also measure LMCache 0.5.6 (installs its own virtualenv on first use)."""

    command: str
    """The command line that produced the results, printed in every results file."""


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` took."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    """Median, NaN for no values (a competitor that did not run)."""
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> str:
    """``min-max`` of the values, to show the noise beside a median."""
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def git_commit() -> str:
    """Short commit of the checkout, with ``+dirty`` if the working tree differs."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=False).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def filesystem_of(path: Path) -> str:
    """``type device`` of the mount that holds ``path`` (from /proc/mounts)."""
    best, desc = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return desc
    target = str(path.resolve())
    for line in mounts:
        device, mount_point, fs_type = line.split()[:3]
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best):
            best, desc = mount_point, f"{fs_type} on {device} (mounted at {mount_point})"
    return desc


def cpu_model() -> str:
    """The CPU model name as the kernel reports it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_lines(work_dir: Path, extra: Sequence[str] = ()) -> list[str]:
    """Markdown bullet lines describing the machine and software of this run."""
    import torch

    from lmcache_fs import __version__

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, "
        f"Linux {platform.release()}",
        f"- Filesystem under test: {filesystem_of(work_dir)}",
        f"- Software: lmcache-fs {__version__} (commit {git_commit()}), Python "
        f"{platform.python_version()}, torch {torch.__version__}",
        *extra,
    ]


def results_header(title: str, opts: BenchOptions, extra: Sequence[str] = ()) -> list[str]:
    """Title, machine, versions and the exact command, as markdown lines."""
    return [f"# {title}", "", *machine_lines(opts.work_dir, extra),
            f"- Command: `{opts.command}`" + (" (quick: smoke-test sizes, not a measurement)"
                                             if opts.quick else ""),
            ""]


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A GitHub markdown table as lines."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def write_markdown(path: Path, lines: Sequence[str]) -> Path:
    """Write the results file and say where it went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return path


def progress(message: str) -> None:
    """One progress line on stderr (results go to files, not the terminal)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
