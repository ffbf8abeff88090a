"""lmcache-fs: a shared-filesystem KV cache for vLLM.

The storage engine lives here and never imports vLLM; the vLLM adapter is
``lmcache_fs.connector`` (source directory ``connector/``).
"""

__version__ = "0.1.0"
