"""Greedy answers of engine processes, each timed: what the fault tests assert and report."""

from __future__ import annotations

import json
import time
from pathlib import Path

from engines import EngineProcess


class TimedAnswers:
    """Asks engines for answers and keeps how long each took, by what it was."""

    def __init__(self, max_tokens: int = 8):
        self.max_tokens = max_tokens
        self.seconds: dict[str, float] = {}

    def ask(self, engine: EngineProcess, prompt: list[int], what: str) -> dict:
        """One greedy answer (token ids, cached-token count), its time kept as ``what``."""
        start = time.monotonic()
        (out,) = engine.command("generate", timeout_s=120, prompts=[prompt],
                                max_tokens=self.max_tokens)["outputs"]
        self.seconds[what] = round(time.monotonic() - start, 2)
        return out

    def until_hit(self, engine: EngineProcess, prompt: list[int], what: str, hit_tokens: int,
                  tries: int = 10) -> dict:
        """Ask, its own prefix cache emptied each time, until the answer loads ``hit_tokens``
        from the directory (a directory back from an outage is found by a probe first)."""
        out: dict = {}
        for _ in range(tries):
            engine.reset_prefix_cache()
            out = self.ask(engine, prompt, what)
            if out["num_cached_tokens"] >= hit_tokens:
                break
            time.sleep(1.0)
        return out

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.seconds, indent=2) + "\n")
