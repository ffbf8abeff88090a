"""CUDA pieces: kernel loading, block-copy kernels, the device checksum, device-bound threads."""
