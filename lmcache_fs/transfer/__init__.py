"""Moving chunks between files and vLLM's paged KV cache: block copies, whole-chunk and layer-wise readers, device saves."""
