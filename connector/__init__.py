"""The vLLM adapter of lmcache-fs (installed as ``lmcache_fs.connector``).

``kv_connector_module_path`` is ``lmcache_fs.connector``; with the package
installed, the name ``LMCacheFSConnector`` alone works (see :mod:`.plugin`).
"""

from .lmcache_fs_connector import LMCacheFSConnector

__all__ = ["LMCacheFSConnector"]
