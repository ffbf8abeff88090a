"""A one-line progress counter on stderr for long CLI commands.

Drawn only when stderr is a terminal, so scripts and ``--json`` consumers see
clean output; redrawn at most five times a second.

    verify tiny-llama-50168c6f  1200/5000  24%  3.1 s
"""

from __future__ import annotations

import sys
import time
from typing import IO, Iterable, Iterator, TypeVar

T = TypeVar("T")

_REDRAW_S = 0.2


class Progress:
    """Counts steps and redraws one status line; use as a context manager."""

    def __init__(self, label: str, total: int | None = None, stream: IO[str] | None = None,
                 enabled: bool | None = None):
        self.label = label
        self.total = total
        self.done = 0
        self._stream = stream or sys.stderr
        self._enabled = self._stream.isatty() if enabled is None else enabled
        self._start = time.monotonic()
        self._drawn_at = 0.0

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more steps done."""
        self.done += n
        now = time.monotonic()
        if self._enabled and now - self._drawn_at >= _REDRAW_S:
            self._drawn_at = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        count = f"{self.done}/{self.total}  {100 * self.done // max(self.total, 1):3d}%" \
            if self.total is not None else f"{self.done}"
        self._stream.write(f"\r{self.label}  {count}  {now - self._start:.1f} s\033[K")
        self._stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._enabled:
            self._draw(time.monotonic())
            self._stream.write("\n")
            self._stream.flush()


def track(items: Iterable[T], label: str, total: int | None = None) -> Iterator[T]:
    """Yield ``items`` while showing how many have been handled."""
    with Progress(label, total) as progress:
        for item in items:
            yield item
            progress.advance()
