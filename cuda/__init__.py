"""The CUDA kernel sources (package data): located by lmcache_fs.gpu.kernels, compiled on first use."""
