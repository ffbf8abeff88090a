"""Helpers for the demo tests: a fake vLLM server for the page, and the real launcher.

``FakeEngine`` answers the few endpoints the page uses (/health, /v1/models,
/tokenize, /metrics, streamed /v1/chat/completions) the way vLLM 0.32 does,
so Streamlit AppTest can drive the page without starting real engines.
``Launcher`` runs ``frontend/launcher.py`` as a real process group.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FRONTEND = REPO / "frontend"
if str(FRONTEND) not in sys.path:
    sys.path.insert(0, str(FRONTEND))  # the page's modules import each other by name


class FakeEngine:
    """A stand-in vLLM server on a free local port.

    Args:
        answer: the text streamed back, one chunk per character.
        shared_hits: tokens reported as loaded from the shared directory per request.
        fail_with: if set, chat requests get HTTP 400 with this error message.
        delay_s: wait this long before the first streamed chunk (a slow prefill).
    """

    def __init__(self, answer: str = "hello", shared_hits: int = 0, fail_with: str = "",
                 max_model_len: int = 8192, delay_s: float = 0.0):
        self.answer = answer
        self.delay_s = delay_s
        self.shared_hits = shared_hits
        self.fail_with = fail_with
        self.max_model_len = max_model_len
        self.requests: list[dict[str, Any]] = []
        self.counters = {"local": 0.0, "shared": 0.0}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def chats(self) -> list[dict[str, Any]]:
        """The chat-completion requests received so far."""
        return [r for r in self.requests if r["path"] == "/v1/chat/completions"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._send(200, b"")
                elif self.path == "/v1/models":
                    self._send(200, json.dumps({"data": [{"id": "fake-model",
                                                          "max_model_len": engine.max_model_len}]}).encode())
                elif self.path == "/metrics":
                    text = (f'vllm:prefix_cache_hits_total{{engine="0"}} {engine.counters["local"]}\n'
                            f'vllm:external_prefix_cache_hits_total{{engine="0"}} {engine.counters["shared"]}\n')
                    self._send(200, text.encode(), "text/plain")
                else:
                    self._send(404, b'{"detail":"Not Found"}')

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                record = {"path": self.path, "t_start": time.monotonic(), **body}
                engine.requests.append(record)
                if self.path == "/tokenize":
                    self._send(200, json.dumps({"count": len(body["prompt"])}).encode())
                    return
                if engine.fail_with:
                    self._send(400, json.dumps({"error": {"message": engine.fail_with}}).encode())
                    return
                engine.counters["shared"] += engine.shared_hits
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                prompt_tokens = len(body["messages"][0]["content"])
                chunks = [{"choices": [{"delta": {"role": "assistant", "content": ""}}]}]
                chunks += [{"choices": [{"delta": {"content": c}}]} for c in engine.answer]
                chunks.append({"choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                        "completion_tokens": len(engine.answer)}})
                time.sleep(engine.delay_s)
                for chunk in chunks:
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                record["t_end"] = time.monotonic()

        return Handler


def closed_port_url() -> str:
    """A local URL where nothing listens (an engine that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class Launcher:
    """``frontend/launcher.py`` in its own process group, its output collected line by line."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str]):
        self.log_path = log_path
        self.lines: list[str] = []
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(FRONTEND / "launcher.py"), *args],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1, start_new_session=True,
                                     env={**os.environ, **env})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._log.write(line)
            self._log.flush()

    def wait_for_line(self, pattern: str, timeout_s: float) -> re.Match[str]:
        """The first output line matching ``pattern``; fails if the launcher exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = regex.search(line)
                if match:
                    return match
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise AssertionError(f"launcher exited ({self.proc.returncode}) before "
                                     f"{pattern!r}:\n" + "\n".join(self.lines[-40:]))
            time.sleep(0.5)
        raise AssertionError(f"no {pattern!r} in {timeout_s:.0f} s:\n" + "\n".join(self.lines[-40:]))

    def interrupt(self, timeout_s: float = 90.0) -> int:
        """Ctrl-C the launcher (SIGINT to it alone) and wait for it to clean up."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(5)
        self._log.close()
        return self.proc.returncode


def pids_with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment has ``name=value`` (children inherit it)."""
    needle = f"{name}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids
