"""Benchmarks of lmcache-fs beside its peers: ``python -m bench.run --help``.

Each suite measures its competitors side by side in one process run,
interleaved and repeated, and writes a markdown table plus PNG plots to
``bench/results/``.
"""
