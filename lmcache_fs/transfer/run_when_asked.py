"""A step with a future's interface that runs on the consumer's thread, when asked.

The whole-chunk reader keeps its reads in flight as a queue of futures and
takes their results in order. A read that needs no host work once its bytes
have landed (a kvikio read checked on the GPU, or not at all) would cost a
pool thread's hand-off of the GIL per chunk, more than the read itself for
2 MiB chunks on a 16-core host; :class:`RunWhenAsked` lets such a read finish
on the thread that asks for its result instead, in the same queue.
"""

from __future__ import annotations

from typing import Callable


class RunWhenAsked:
    """Runs ``step`` the first time its result or exception is asked for, on the asking thread.

    Like a :class:`concurrent.futures.Future`: :meth:`exception` returns what
    the step raised (or None), :meth:`result` raises it, and :meth:`cancel`
    returns False (as for a running future: what the step finishes is already
    under way).
    """

    def __init__(self, step: Callable[[], None]):
        self._step: Callable[[], None] | None = step
        self._error: Exception | None = None

    def exception(self) -> Exception | None:
        if self._step is not None:
            step, self._step = self._step, None
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - handed to the caller like a Future's
                self._error = exc
        return self._error

    def result(self) -> None:
        error = self.exception()
        if error is not None:
            raise error

    def cancel(self) -> bool:
        return False
