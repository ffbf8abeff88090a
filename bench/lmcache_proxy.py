"""Talk to LMCache's storage paths in their own venv: :mod:`bench.lmcache_side` over a pipe.

One long-lived worker process serves a whole suite, so LMCache's import and
buffer-pool set-up (seconds) never fall inside a timing and the competitors
can be interleaved call by call with lmcache-fs's.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from bench.common import REPO

SIDE_SCRIPT = REPO / "bench" / "lmcache_side.py"


class LMCacheError(RuntimeError):
    """The LMCache worker reported a failure or died."""


class LMCacheWorker:
    """A running ``lmcache_side.py``; each method is one JSON request and reply."""

    def __init__(self, python: Path, log: Path):
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = log.open("w")
        # Run as a script (not -m) from bench/, so the repository root, where
        # lmcache-fs lives, is not on the worker's import path.
        self._proc = subprocess.Popen([str(python), str(SIDE_SCRIPT)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, text=True,
                                      bufsize=1)
        self.log_path = log
        self.versions = self.call("hello")

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one command and return its reply; raises :class:`LMCacheError`."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except BrokenPipeError as exc:
            raise LMCacheError(f"LMCache worker died (see {self.log_path})") from exc
        if not line:
            raise LMCacheError(f"LMCache worker exited (see {self.log_path})")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise LMCacheError(f"LMCache {op} failed: {reply['error']}")
        return reply

    def close(self) -> None:
        """Ask the worker to quit and wait for it."""
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write('{"op": "quit"}\n')
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._log.close()

    def __enter__(self) -> "LMCacheWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
