"""A small client for vLLM's OpenAI-compatible server: health, tokens, metrics, streamed answers.

Every call turns network and server failures into a short message meant for a
person (``EngineError`` or a :class:`Failed` event), never a stack trace, so a
page column can say what is wrong with its engine while the others keep going.

Example:
    >>> visible_text("ok\\x01")
    'ok␁'
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Union

import openai
import requests
from demo_config import EngineConfig
from prometheus_client.parser import text_string_to_metric_families

HEALTH_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 10.0
STREAM_TIMEOUT_S = 600.0

# Control characters (bar newline and tab) shown as Unicode control pictures:
# the synthetic model's answers are mostly bytes like \x01 that would print as nothing.
_CONTROL_PICTURES = {c: 0x2400 + c for c in range(0x20) if chr(c) not in "\n\t"} | {0x7F: 0x2421}


class EngineError(RuntimeError):
    """An engine could not answer; ``str(exc)`` is a one-line message for the page."""


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str


@dataclass(frozen=True)
class ModelInfo:
    """The model an engine serves (its id in requests) and its context limit."""

    id: str
    max_model_len: int | None


@dataclass(frozen=True)
class CacheCounters:
    """Prompt tokens an engine did not recompute, from its /metrics (cumulative)."""

    local_hit_tokens: float
    """``vllm:prefix_cache_hits_total``: found in the engine's own prefix cache."""
    shared_hit_tokens: float
    """``vllm:external_prefix_cache_hits_total``: loaded by the KV connector (the shared directory)."""

    def __sub__(self, other: "CacheCounters") -> "CacheCounters":
        return CacheCounters(self.local_hit_tokens - other.local_hit_tokens,
                             self.shared_hit_tokens - other.shared_hit_tokens)


@dataclass(frozen=True)
class FirstToken:
    """The first streamed token arrived ``ttft_s`` seconds after the request was sent."""

    ttft_s: float


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    total_s: float
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclass(frozen=True)
class Failed:
    message: str


StreamEvent = Union[FirstToken, Delta, Finished, Failed]


def _describe(engine: EngineConfig, exc: requests.RequestException) -> str:
    if isinstance(exc, requests.ConnectionError):
        return f"{engine.label} is not reachable at {engine.url}: is the engine running?"
    if isinstance(exc, requests.Timeout):
        return f"{engine.label} did not answer in time ({engine.url})"
    return f"{engine.label}: request failed ({type(exc).__name__})"


def _server_message(response: requests.Response) -> str:
    """The error text a vLLM server put in its JSON body, else the HTTP reason."""
    try:
        body = response.json()
    except ValueError:
        return response.reason or "no details"
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return str(error.get("message") or error.get("detail") or error)
    return str(error)


def _get(engine: EngineConfig, path: str, timeout: float) -> requests.Response:
    try:
        response = requests.get(engine.url + path, timeout=timeout)
    except requests.RequestException as exc:
        raise EngineError(_describe(engine, exc)) from None
    if response.status_code >= 400:
        raise EngineError(f"{engine.label} answered HTTP {response.status_code} on {path}: "
                          f"{_server_message(response)}")
    return response


def check_health(engine: EngineConfig, timeout: float = HEALTH_TIMEOUT_S) -> Health:
    """Ask the engine's ``/health``; never raises."""
    try:
        _get(engine, "/health", timeout)
    except EngineError as exc:
        return Health(False, str(exc))
    return Health(True, "healthy")


def model_info(engine: EngineConfig, timeout: float = REQUEST_TIMEOUT_S) -> ModelInfo:
    """The first model listed by ``/v1/models``."""
    try:
        models = _get(engine, "/v1/models", timeout).json()["data"]
        first = models[0]
        return ModelInfo(str(first["id"]), first.get("max_model_len"))
    except (ValueError, KeyError, IndexError, TypeError):
        raise EngineError(f"{engine.label} returned no model list on /v1/models") from None


def count_tokens(engine: EngineConfig, model: str, text: str,
                 timeout: float = REQUEST_TIMEOUT_S) -> int:
    """The number of tokens the engine's own tokenizer makes of ``text``."""
    try:
        response = requests.post(engine.url + "/tokenize", timeout=timeout,
                                 json={"model": model, "prompt": text, "add_special_tokens": False})
    except requests.RequestException as exc:
        raise EngineError(_describe(engine, exc)) from None
    if response.status_code >= 400:
        raise EngineError(f"{engine.label} could not tokenize: {_server_message(response)}")
    try:
        return int(response.json()["count"])
    except (ValueError, KeyError, TypeError):
        raise EngineError(f"{engine.label} returned no token count on /tokenize") from None


def metric_sum(metrics_text: str, name: str) -> float:
    """Sum of every sample named ``name`` (all label sets) in Prometheus text."""
    return sum(sample.value for family in text_string_to_metric_families(metrics_text)
               for sample in family.samples if sample.name == name)


def cache_counters(engine: EngineConfig, timeout: float = REQUEST_TIMEOUT_S) -> CacheCounters:
    """The engine's cumulative prefix-cache hit counters from ``/metrics``."""
    text = _get(engine, "/metrics", timeout).text
    return CacheCounters(metric_sum(text, "vllm:prefix_cache_hits_total"),
                         metric_sum(text, "vllm:external_prefix_cache_hits_total"))


def build_messages(context: str, question: str,
                   earlier: Sequence[tuple[str, str]] = ()) -> list[dict[str, str]]:
    """A chat on ``context``: context first, so every question on it shares its prefix.

    The context and the first question form one user message (a system message
    would be simpler, but Mistral-Instruct's template rejects one). Each
    ``earlier`` (question, answer) exchange comes before ``question``, so a
    follow-up turn's prompt begins with the whole earlier turn.
    """
    questions = [q for q, _ in earlier] + [question]
    messages = [{"role": "user", "content": f"{context}\n\nQuestion: {questions[0]}"}]
    for (_, answer), follow_up in zip(earlier, questions[1:]):
        messages += [{"role": "assistant", "content": answer},
                     {"role": "user", "content": follow_up}]
    return messages


def _status_message(exc: openai.APIStatusError) -> str:
    """The error text a vLLM server put in its JSON body, else the client's summary."""
    body = exc.body.get("error", exc.body) if isinstance(exc.body, dict) else exc.body
    if isinstance(body, dict):
        return str(body.get("message") or body.get("detail") or body)
    return str(body or exc.message)


def stream_answer(engine: EngineConfig, model: str, messages: list[dict[str, str]],
                  max_tokens: int, timeout: float = STREAM_TIMEOUT_S) -> Iterator[StreamEvent]:
    """Stream a greedy chat completion (OpenAI's client); TTFT is taken at the first token.

    vLLM sends its first chunk (the ``role`` chunk) together with the first
    generated token, so the first chunk carrying ``choices`` marks the first
    token even when its text is empty (a partial UTF-8 byte).

    Yields:
        ``FirstToken`` once, ``Delta`` for each piece of text, then exactly one
        ``Finished`` or ``Failed`` (an error before or during the stream).
    """
    client = openai.OpenAI(base_url=engine.url + "/v1", api_key="not-needed", max_retries=0,
                           timeout=openai.Timeout(timeout, connect=REQUEST_TIMEOUT_S))
    start = time.perf_counter()
    seen_first = False
    usage = None
    try:
        with client, client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens,  # type: ignore[arg-type]
                temperature=0.0, stream=True, stream_options={"include_usage": True}) as stream:
            for chunk in stream:
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    if not seen_first:
                        seen_first = True
                        yield FirstToken(time.perf_counter() - start)
                    if choice.delta.content:
                        yield Delta(choice.delta.content)
    except openai.APITimeoutError:
        yield Failed(f"{engine.label} did not answer in time ({engine.url})")
        return
    except openai.APIConnectionError:
        yield Failed(f"{engine.label} is not reachable at {engine.url}: is the engine running?")
        return
    except openai.APIStatusError as exc:
        yield Failed(f"{engine.label} rejected the request (HTTP {exc.status_code}): "
                     f"{_status_message(exc)}")
        return
    except openai.APIError as exc:  # an error event in the middle of the stream
        yield Failed(f"{engine.label} failed while answering: {exc.message}")
        return
    except ValueError:
        yield Failed(f"{engine.label} sent an unreadable stream chunk")
        return
    if not seen_first:
        yield Failed(f"{engine.label} closed the stream without generating a token")
        return
    yield Finished(time.perf_counter() - start, usage.prompt_tokens if usage else None,
                   usage.completion_tokens if usage else None)


def visible_text(text: str) -> str:
    """``text`` with control characters shown as visible symbols (newlines kept)."""
    return text.translate(_CONTROL_PICTURES)
