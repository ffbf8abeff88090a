"""lmcache-fs logs through vLLM's logging setup inside vLLM, its own stderr handler elsewhere.

Each case runs in a fresh interpreter: logging is process-wide state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmcache_fs.log import human_bytes

pytest.importorskip("vllm")

# An engine process: vLLM sets its logging up (from its environment), then the connector ours.
_INSIDE_VLLM = """
import logging
from vllm.config.logging import LoggingConfig
from vllm.logger import configure_logging
from lmcache_fs.log import init_logging
configure_logging(LoggingConfig())
init_logging(inside_vllm=True)
logging.getLogger("lmcache_fs.connector.worker").info("hello from lmcache-fs")
logging.getLogger("lmcache_fs.connector.worker").debug("per-request detail")
"""


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_LOGGING", "LMCACHE_FS_LOG"))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**clean, **env}, check=False)


def test_inside_vllm_lines_have_vllms_format_stream_and_level():
    done = _run(_INSIDE_VLLM)
    assert done.returncode == 0, done.stderr
    (line,) = [ln for ln in done.stdout.splitlines() if "hello from lmcache-fs" in ln]
    # vLLM's format: "(process pid=N) LEVEL mm-dd hh:mm:ss [file:line] message", on stdout.
    assert line.startswith("(MainProcess pid=") and " INFO " in line and "[<string>:" in line
    assert "hello" not in done.stderr and "per-request detail" not in done.stdout
    debug = _run(_INSIDE_VLLM, VLLM_LOGGING_LEVEL="DEBUG")
    assert "per-request detail" in debug.stdout


def test_inside_vllm_a_logging_config_file_is_honoured(tmp_path: Path):
    log_file = tmp_path / "vllm.log"
    config = {"version": 1, "disable_existing_loggers": False,
              "formatters": {"plain": {"format": "CUSTOM %(levelname)s %(name)s %(message)s"}},
              "handlers": {"file": {"class": "logging.FileHandler", "filename": str(log_file),
                                    "formatter": "plain", "level": "INFO"}},
              "loggers": {"vllm": {"handlers": ["file"], "level": "INFO", "propagate": False}}}
    (tmp_path / "logging.json").write_text(json.dumps(config))
    done = _run(_INSIDE_VLLM, VLLM_LOGGING_CONFIG_PATH=str(tmp_path / "logging.json"))
    assert done.returncode == 0, done.stderr
    assert "CUSTOM INFO lmcache_fs.connector.worker hello from lmcache-fs" in log_file.read_text()
    assert "hello" not in done.stdout + done.stderr


def test_outside_vllm_lines_go_to_stderr_tagged_lmcache_fs():
    done = _run("import logging\nfrom lmcache_fs.log import init_logging\ninit_logging()\n"
                "logging.getLogger('lmcache_fs.ops.cli').info('hello')")
    assert done.stdout == "" and done.stderr.startswith("LMCache-FS INFO ") and "hello" in done.stderr


@pytest.mark.parametrize(("n", "text"), [(10, "10 B"), (1536, "2 KB"), (94e6, "94.0 MB"),
                                         (1.2e9, "1.2 GB"), (512e9, "512 GB")])
def test_sizes_are_decimal_like_vllms_and_bandwidth_figures(n, text):
    assert human_bytes(n) == text
