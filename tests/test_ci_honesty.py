"""With CI=true a skipped engine, fault or browser test fails the run; GPU tests may still skip."""

import os
import subprocess
import sys
from pathlib import Path

SKIPPING = '''
import pytest

@pytest.mark.engine
def test_engine_without_its_tool():
    pytest.skip("bindfs is not installed")

def test_fault_without_a_mount():
    pytest.skip("needs root to mount")

@pytest.mark.gpu
def test_gpu_without_cuda():
    pytest.skip("needs CUDA")
'''


# The repository's conftest, loaded under another name with its own __file__ (its imports
# and sys.path entries stay right), providing its hooks to the scratch test run.
CONFTEST = '''
import importlib.util

_spec = importlib.util.spec_from_file_location("repo_conftest", {path!r})
_repo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_repo)
pytest_runtest_makereport = _repo.pytest_runtest_makereport
'''


def _outcomes(tmp_path: Path, ci: str | None) -> str:
    (tmp_path / "conftest.py").write_text(CONFTEST.format(path=str(Path(__file__).with_name("conftest.py"))))
    (tmp_path / "test_faults.py").write_text(SKIPPING)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           "-W", "ignore::pytest.PytestUnknownMarkWarning", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    return done.stdout


def test_in_ci_a_skipped_engine_or_fault_test_fails_and_a_gpu_test_still_skips(tmp_path):
    out = _outcomes(tmp_path, "true")
    assert "2 failed, 1 skipped" in out, out
    assert "skipped in CI (CI=true)" in out and "bindfs is not installed" in out


def test_outside_ci_the_same_tests_skip(tmp_path):
    assert "3 skipped" in _outcomes(tmp_path, None)
