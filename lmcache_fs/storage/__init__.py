"""Chunk files on a shared directory: format, paths, publish, index, store, writer. Imports nothing above it."""
