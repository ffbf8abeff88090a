"""A small client for vLLM's OpenAI-compatible server: health, tokens, metrics, streamed answers.

Every call turns network and server failures into a short message meant for a
person (``EngineError`` or a :class:`Failed` event), never a stack trace, so a
page column can say what is wrong with its engine while the others keep going.

Example:
    >>> visible_text("ok\\x01")
    'ok␁'
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator, Union

import requests
from demo_config import EngineConfig

HEALTH_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 10.0
STREAM_TIMEOUT_S = 600.0

_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
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
    """Sum of every sample of metric ``name`` (all label sets) in Prometheus text."""
    total = 0.0
    for line in metrics_text.splitlines():
        match = _SAMPLE_RE.match(line)
        if match and match.group(1) == name:
            total += float(match.group(3))
    return total


def cache_counters(engine: EngineConfig, timeout: float = REQUEST_TIMEOUT_S) -> CacheCounters:
    """The engine's cumulative prefix-cache hit counters from ``/metrics``."""
    text = _get(engine, "/metrics", timeout).text
    return CacheCounters(metric_sum(text, "vllm:prefix_cache_hits_total"),
                         metric_sum(text, "vllm:external_prefix_cache_hits_total"))


def build_messages(context: str, question: str) -> list[dict[str, str]]:
    """One user message, context first: every question on a context shares its prefix.

    (A system message would be simpler, but Mistral-Instruct's template rejects one.)
    """
    return [{"role": "user", "content": f"{context}\n\nQuestion: {question}"}]


def stream_answer(engine: EngineConfig, model: str, messages: list[dict[str, str]],
                  max_tokens: int, timeout: float = STREAM_TIMEOUT_S) -> Iterator[StreamEvent]:
    """Stream a greedy chat completion; TTFT is taken at the first streamed token.

    vLLM sends its first chunk (the ``role`` chunk) together with the first
    generated token, so the first chunk carrying ``choices`` marks the first
    token even when its text is empty (a partial UTF-8 byte).

    Yields:
        ``FirstToken`` once, ``Delta`` for each piece of text, then exactly one
        ``Finished`` or ``Failed`` (an error before or during the stream).
    """
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens,
                            "temperature": 0.0, "stream": True,
                            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    seen_first = False
    usage: dict[str, Any] = {}
    try:
        with requests.post(engine.url + "/v1/chat/completions", json=body, stream=True,
                           timeout=(REQUEST_TIMEOUT_S, timeout)) as response:
            if response.status_code >= 400:
                yield Failed(f"{engine.label} rejected the request (HTTP {response.status_code}): "
                             f"{_server_message(response)}")
                return
            for raw in response.iter_lines():
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:"):].strip()
                if payload == "[DONE]":
                    break
                try:
                    chunk = json.loads(payload)
                except ValueError:
                    yield Failed(f"{engine.label} sent an unreadable stream chunk")
                    return
                if "error" in chunk:
                    error = chunk["error"]
                    message = error.get("message", error) if isinstance(error, dict) else error
                    yield Failed(f"{engine.label} failed while answering: {message}")
                    return
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    if not seen_first:
                        seen_first = True
                        yield FirstToken(time.perf_counter() - start)
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield Delta(text)
    except requests.RequestException as exc:
        yield Failed(_describe(engine, exc))
        return
    if not seen_first:
        yield Failed(f"{engine.label} closed the stream without generating a token")
        return
    yield Finished(time.perf_counter() - start, usage.get("prompt_tokens"),
                   usage.get("completion_tokens"))


def visible_text(text: str) -> str:
    """``text`` with control characters shown as visible symbols (newlines kept)."""
    return text.translate(_CONTROL_PICTURES)
