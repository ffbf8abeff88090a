"""A real vLLM engine in its own process, driven line by line over stdin/stdout.

Started by tests/engines.py. Each stdin line is a JSON command; each reply is
one stdout line starting with REPLY_MARKER (vLLM's own logs go to the same
stream and are skipped by the reader).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

REPLY_MARKER = "@@ENGINE-REPLY@@ "


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--connector-config", default="", help="JSON kv_transfer_config, or empty")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--max-num-batched-tokens", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--speculative-config", default="", help="JSON speculative_config, or empty")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--engine-args", default="", help="JSON of more vllm.LLM arguments")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kwargs: dict = {}
    if args.connector_config:
        kwargs["kv_transfer_config"] = KVTransferConfig(**json.loads(args.connector_config))
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
        kwargs["enable_chunked_prefill"] = True
    if args.speculative_config:
        kwargs["speculative_config"] = json.loads(args.speculative_config)
    if args.engine_args:
        kwargs.update(json.loads(args.engine_args))
    llm = LLM(args.model, enforce_eager=True, kv_cache_memory_bytes=512 << 20,
              max_model_len=args.max_model_len, seed=0, dtype=args.dtype,
              tensor_parallel_size=args.tensor_parallel_size, **kwargs)

    def reply(obj: dict) -> None:
        sys.stdout.write(REPLY_MARKER + json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "generate":
            params = SamplingParams(max_tokens=cmd.get("max_tokens", 8), temperature=0.0,
                                    ignore_eos=True, logprobs=0 if cmd.get("logprobs") else None)
            outputs = []
            for ids in cmd["prompts"]:
                start = time.perf_counter()
                out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
                outputs.append({"token_ids": list(out.outputs[0].token_ids),
                                "num_cached_tokens": out.num_cached_tokens or 0,
                                # with "logprobs": each sampled token's logprob (greedy: the top one)
                                "logprobs": [step[tok].logprob for step, tok in
                                             zip(out.outputs[0].logprobs or [],
                                                 out.outputs[0].token_ids)],
                                "seconds": time.perf_counter() - start})
            reply({"outputs": outputs})
        elif op == "reset_prefix_cache":
            reply({"ok": bool(llm.reset_prefix_cache())})
        elif op == "quit":
            reply({"ok": True})
            break


if __name__ == "__main__":
    main()
