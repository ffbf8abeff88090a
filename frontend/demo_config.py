"""What the demo page shows: its engines, the shared cache directory, sample documents.

The page reads one YAML file, named by ``LMCACHE_FS_DEMO_CONFIG`` (default:
``frontend/engines.compose.yaml``, the docker compose topology). The local
launcher writes its own file with the ports it picked.

    synthetic_model: false        # true: answers are meaningless, only timings count
    sequential: false             # true: ask engines one at a time (shared CPU)
    cache_dir: /kv                # the shared directory, if the page can see it
    engines:
      - {label: "A · lmcache-fs", url: "http://engine-a:8000", uses_cache: true}
      - {label: "C · plain vLLM", url: "http://engine-c:8000", uses_cache: false}

Example:
    >>> cfg = parse_demo_config({"engines": [{"label": "A", "url": "http://h:1"}]})
    >>> cfg.engines[0].uses_cache
    False
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

CONFIG_ENV = "LMCACHE_FS_DEMO_CONFIG"
FRONTEND_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = FRONTEND_DIR / "engines.compose.yaml"
DOCUMENTS_DIR = FRONTEND_DIR / "documents"


class DemoConfigError(ValueError):
    """The demo configuration file is missing or wrong; the message says how to fix it."""


@dataclass(frozen=True)
class EngineConfig:
    """One OpenAI-compatible vLLM server the page talks to."""

    label: str
    url: str
    uses_cache: bool = False


@dataclass(frozen=True)
class DemoConfig:
    """The whole page configuration, validated once when read."""

    engines: tuple[EngineConfig, ...]
    cache_dir: str = ""
    synthetic_model: bool = False
    sequential: bool = False


def parse_demo_config(data: Mapping[str, Any], source: str = "demo config") -> DemoConfig:
    """Validate a mapping (a parsed YAML file) into a :class:`DemoConfig`.

    Raises:
        DemoConfigError: no engines, an engine without label or http(s) URL,
            duplicate labels, unknown keys.
    """
    known = {"engines", "cache_dir", "synthetic_model", "sequential"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DemoConfigError(f"{source}: unknown key(s) {unknown}; known: {sorted(known)}")
    raw_engines = data.get("engines") or []
    if not isinstance(raw_engines, list) or not raw_engines:
        raise DemoConfigError(f"{source}: 'engines' must be a non-empty list of "
                              "{label, url, uses_cache} entries")
    engines = []
    for i, raw in enumerate(raw_engines):
        if not isinstance(raw, dict) or not raw.get("label") or not raw.get("url"):
            raise DemoConfigError(f"{source}: engine #{i + 1} needs a 'label' and a 'url'")
        url = str(raw["url"]).rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise DemoConfigError(f"{source}: engine {raw['label']!r} url {url!r} must start "
                                  "with http:// or https://")
        engines.append(EngineConfig(str(raw["label"]), url, bool(raw.get("uses_cache", False))))
    labels = [e.label for e in engines]
    if len(set(labels)) != len(labels):
        raise DemoConfigError(f"{source}: engine labels must be unique, got {labels}")
    return DemoConfig(engines=tuple(engines), cache_dir=str(data.get("cache_dir") or ""),
                      synthetic_model=bool(data.get("synthetic_model", False)),
                      sequential=bool(data.get("sequential", False)))


def load_demo_config(path: str | os.PathLike[str] | None = None) -> DemoConfig:
    """Read the YAML file at ``path``, else ``$LMCACHE_FS_DEMO_CONFIG``, else the compose default."""
    source = Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    try:
        data = yaml.safe_load(source.read_text()) or {}
    except OSError as exc:
        raise DemoConfigError(f"cannot read the demo config {source}: {exc.strerror}; "
                              f"set {CONFIG_ENV} to a YAML file listing the engines") from exc
    except yaml.YAMLError as exc:
        raise DemoConfigError(f"{source} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise DemoConfigError(f"{source} must hold a YAML mapping with an 'engines' list")
    return parse_demo_config(data, str(source))


def write_demo_config(path: str | os.PathLike[str], config: DemoConfig) -> None:
    """Write ``config`` as the YAML file the page reads (used by the local launcher)."""
    data = {
        "synthetic_model": config.synthetic_model,
        "sequential": config.sequential,
        "cache_dir": config.cache_dir,
        "engines": [{"label": e.label, "url": e.url, "uses_cache": e.uses_cache}
                    for e in config.engines],
    }
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


@dataclass(frozen=True)
class SampleQuestion:
    question: str
    answer: str
    """What a correct reply contains (the answer stands in the document)."""


@dataclass(frozen=True)
class SampleDocument:
    """A bundled long-context document, where it comes from and questions about it."""

    title: str
    text: str
    source: str
    license: str
    questions: tuple[SampleQuestion, ...]


def document_catalog(directory: Path = DOCUMENTS_DIR) -> list[SampleDocument]:
    """The bundled documents in the order of ``catalog.yaml``."""
    entries = yaml.safe_load((directory / "catalog.yaml").read_text())
    return [SampleDocument(str(e["title"]), (directory / e["file"]).read_text(), str(e["source"]),
                           str(e["license"]),
                           tuple(SampleQuestion(str(q["question"]), str(q["answer"]))
                                 for q in e["questions"]))
            for e in entries]


def sample_documents(directory: Path = DOCUMENTS_DIR) -> dict[str, str]:
    """The bundled long-context documents, title to text."""
    return {d.title: d.text for d in document_catalog(directory)}
