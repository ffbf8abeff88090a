"""Progress bars on stderr for long CLI commands (tqdm, as vLLM's own downloads and loads).

Drawn only when stderr is a terminal, so scripts and ``--json`` consumers see
clean output; redrawn at most five times a second.

    verify tiny-llama-50168c6f:  24%|██▍       | 1200/5000 [00:03<00:09, 387.1 files/s]
"""

from __future__ import annotations

import sys
from typing import IO, Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


class Bar(tqdm):
    """A tqdm bar whose count ``n`` grows even when hidden (the CLI reports it)."""

    def update(self, n: float = 1) -> bool | None:
        if self.disable:
            self.n += n
            return None
        return super().update(n)


def progress(label: str, total: int | None = None, stream: IO[str] | None = None,
             enabled: bool | None = None) -> Bar:
    """A bar counting files; ``update(n)`` counts n more, ``n`` is the count so far.

    Args:
        label: what is being done (shown first).
        total: the number expected, if known (then a percentage and an ETA are shown).
        stream: where to draw (default stderr).
        enabled: draw or not; default: only if ``stream`` is a terminal.
    """
    return Bar(desc=label, total=total, file=stream or sys.stderr, unit=" files",
                disable=None if enabled is None else not enabled, mininterval=0.2,
                dynamic_ncols=True)


def track(items: Iterable[T], label: str, total: int | None = None) -> Iterator[T]:
    """Yield ``items`` while showing how many have been handled."""
    with progress(label, total) as bar:
        for item in items:
            yield item
            bar.update()
