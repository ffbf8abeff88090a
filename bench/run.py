"""One command for every benchmark: ``python -m bench.run [SUITE ...] [--quick]``.

A suite is a module with ``run(opts: BenchOptions) -> list[Path]`` that writes
its results under ``opts.results_dir``. To add one, add its module to
``SUITES``; with no suite named, all of them run in the order listed.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from pathlib import Path

from bench.common import RESULTS_DIR, WORK_DIR, BenchOptions, progress

SUITES = {
    "storage": "bench.storage",  # store/load GB/s against raw I/O and LMCache's paths
    "integrity": "bench.integrity",  # loads with integrity_key_file against the same without
    "lookup": "bench.lookup",  # prefix lookup, start-up scan and index memory at 10k-1M files
    "ttft": "bench.ttft",  # TTFT of a second instance vs context length, peers side by side
    "ttft-real": "bench.ttft_real",  # the same on the demo's real chat model (SmolLM2-135M)
    "ttft-tp": "bench.ttft_tp",  # loaded against recompute at TP=2, beside TP=1
    "demo-dtype": "bench.demo_dtype",  # the demo's model in float32 (its default) against bf16
    "decode": "bench.decode",  # inter-token latency while the connector stores
    "multi": "bench.multi_instance",  # round-robin multi-round chat on two instances
    "block-copy-cpu": "bench.block_copy_cpu",  # CPU gathers/scatters: numpy vs a copy_ per page
}


def parse_args(argv: list[str]) -> tuple[list[str], BenchOptions]:
    """Suites to run, and the options they share."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="*", choices=[[], *SUITES], metavar="SUITE",
                        help=f"any of {', '.join(SUITES)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, one round: checks the code paths in seconds")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved repetitions (default 5, or 1 with --quick)")
    parser.add_argument("--no-lmcache", action="store_true",
                        help="skip LMCache (otherwise installed into .bench-venv-lmcache on first use)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help=f"where tables and plots go (default {RESULTS_DIR})")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR,
                        help="scratch directory on the filesystem under test; cached file "
                             f"trees for the lookup suite are kept there (default {WORK_DIR})")
    args = parser.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    command = "python -m bench.run" + "".join(" " + shlex.quote(a) for a in argv)
    return args.suites or list(SUITES), BenchOptions(
        quick=args.quick, rounds=rounds, results_dir=args.results_dir,
        work_dir=args.work_dir, lmcache=not args.no_lmcache, command=command)


def main(argv: list[str] | None = None) -> list[Path]:
    """Run the chosen suites; returns every file they wrote."""
    suites, opts = parse_args(sys.argv[1:] if argv is None else argv)
    written: list[Path] = []
    for name in suites:
        progress(f"suite {name}")
        written += importlib.import_module(SUITES[name]).run(opts)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
