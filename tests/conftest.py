"""Shared fixtures: the synthetic model and real engine processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))  # engines.py / engine_worker.py
sys.path.insert(1, str(REPO / "frontend"))  # the demo tooling imports its modules by name


@pytest.fixture(scope="session")
def synthetic_model() -> Path:
    """A random-weight Llama folder built once per machine (cached under .cache/)."""
    from synthetic_model import build_synthetic_model

    return build_synthetic_model(REPO / ".cache" / "tiny-llama")


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    path = REPO / "tests" / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path
