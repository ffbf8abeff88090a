"""Shared fixtures: the synthetic model and real engine processes."""

from __future__ import annotations

import json
import os
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
def real_model() -> Path:
    """SmolLM2-135M-Instruct from its PyPI wheel, converted once per machine (under .cache/)."""
    from real_model import DEFAULT_MODEL_DIR, build_real_model

    return build_real_model(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    path = REPO / "tests" / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def notes(request, artifacts_dir):
    """What a module's tests measured: a dict they fill, written at the module's end as JSON to
    ``tests/artifacts/`` under the module's ``NOTES_FILE``."""
    found: dict = {}
    yield found
    (artifacts_dir / request.module.NOTES_FILE).write_text(json.dumps(found, indent=2) + "\n")


# CI honesty: where CI=true, a skipped engine, fault or browser test fails the run, since
# `make system-deps` installs everything they need (FUSE/bindfs, chromium, docker.io,
# docker-compose, debootstrap) and a skip there hides a broken test. GPU tests still skip on
# machines without CUDA.
_MUST_RUN_IN_CI = ("test_engine_faults.py", "test_faults.py", "test_demo_browser.py",
                   "test_e2e_engines.py", "test_cache_salt.py")


def _must_run_in_ci(item: pytest.Item) -> bool:
    if item.get_closest_marker("gpu") is not None:
        return False
    return item.get_closest_marker("engine") is not None or item.path.name in _MUST_RUN_IN_CI


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and _must_run_in_ci(item):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"skipped in CI (CI=true), which counts as a failure for engine, "
                           f"fault and browser tests: {reason}. Run `make system-deps` as root.")
