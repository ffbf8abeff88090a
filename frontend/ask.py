"""Ask several engines one question and follow their streamed answers as they arrive.

Each engine is served by a worker thread that only does HTTP and puts events on
a queue; the caller's thread (Streamlit's script thread) applies them to
:class:`EngineAnswer` records and redraws through ``on_update``. A failure in
one engine ends only that engine's answer, with a message instead of a trace.

Example:
    >>> answers = ask_engines([], "context", "question", 8, sequential=True,
    ...                       on_update=lambda a: None)
    >>> answers
    []
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from typing import Union

from demo_config import EngineConfig
from engine_client import (
    CacheCounters,
    Delta,
    EngineError,
    Failed,
    Finished,
    FirstToken,
    StreamEvent,
    build_messages,
    cache_counters,
    model_info,
    stream_answer,
)


@dataclass
class EngineAnswer:
    """What one engine has answered so far, and its timings and cache hits."""

    engine: EngineConfig
    text: str = ""
    ttft_s: float | None = None
    total_s: float | None = None
    prompt_tokens: int | None = None
    shared_hit_tokens: int | None = None
    local_hit_tokens: int | None = None
    error: str = ""
    done: bool = False


@dataclass(frozen=True)
class _Hits:
    counters: CacheCounters


@dataclass(frozen=True)
class _Done:
    pass


_Event = Union[StreamEvent, _Hits, _Done]


def _ask_one(engine: EngineConfig, messages: list[dict[str, str]], max_tokens: int,
             events: "queue.Queue[tuple[str, _Event]]") -> None:
    """Worker thread: stream one engine's answer and its cache-hit deltas into ``events``."""
    def put(event: _Event) -> None:
        events.put((engine.label, event))

    try:
        model = model_info(engine).id
        try:
            before: CacheCounters | None = cache_counters(engine)
        except EngineError:
            before = None  # answers still count without hit figures
        failed = False
        for event in stream_answer(engine, model, messages, max_tokens):
            put(event)
            failed = failed or isinstance(event, Failed)
        if before is not None and not failed:
            put(_Hits(cache_counters(engine) - before))
    except EngineError as exc:
        put(Failed(str(exc)))
    except Exception as exc:  # the page shows a message, never a trace
        put(Failed(f"{engine.label}: unexpected error ({type(exc).__name__}: {exc})"))
    finally:
        put(_Done())


def _apply(answer: EngineAnswer, event: _Event) -> None:
    if isinstance(event, FirstToken):
        answer.ttft_s = event.ttft_s
    elif isinstance(event, Delta):
        answer.text += event.text
    elif isinstance(event, Finished):
        answer.total_s = event.total_s
        answer.prompt_tokens = event.prompt_tokens
    elif isinstance(event, Failed):
        answer.error = event.message
    elif isinstance(event, _Hits):
        answer.shared_hit_tokens = int(event.counters.shared_hit_tokens)
        answer.local_hit_tokens = int(event.counters.local_hit_tokens)
    elif isinstance(event, _Done):
        answer.done = True


def ask_engines(engines: Sequence[EngineConfig], context: str, question: str, max_tokens: int,
                sequential: bool, on_update: Callable[[EngineAnswer], None],
                earlier: Sequence[tuple[str, str]] = ()) -> list[EngineAnswer]:
    """Ask every engine; return their answers once all are done.

    Args:
        earlier: (question, answer) exchanges before ``question``: a follow-up turn.
        sequential: one engine at a time, in order (fair timings when engines
            share CPU cores); otherwise all at once.
        on_update: called in the caller's thread after each change to an answer.
    """
    answers = {e.label: EngineAnswer(e) for e in engines}
    messages = build_messages(context, question, earlier)
    events: queue.Queue[tuple[str, _Event]] = queue.Queue()
    pending = list(engines)
    running = 0

    def start_next() -> None:
        nonlocal running
        engine = pending.pop(0)
        threading.Thread(target=_ask_one, args=(engine, messages, max_tokens, events),
                         name=f"ask-{engine.label}", daemon=True).start()
        running += 1

    while pending and (not sequential or running == 0):
        start_next()
    while running:
        label, event = events.get()
        answer = answers[label]
        _apply(answer, event)
        on_update(answer)
        if answer.done:
            running -= 1
            if pending:
                start_next()
    return list(answers.values())


def ask_one(engine: EngineConfig, context: str, question: str, max_tokens: int) -> EngineAnswer:
    """Ask a single engine and wait for its whole answer (``error`` set on failure)."""
    return ask_engines([engine], context, question, max_tokens, sequential=True,
                       on_update=lambda answer: None)[0]
