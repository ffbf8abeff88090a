"""vLLM general plugin: registers ``LMCacheFSConnector`` by name in every vLLM process.

Loaded through the ``vllm.general_plugins`` entry point, so users can omit
``kv_connector_module_path``. It imports nothing heavy: the connector module
is only imported when an engine asks for it.
"""

from __future__ import annotations

CONNECTOR_NAME = "LMCacheFSConnector"
CONNECTOR_MODULE = "lmcache_fs.connector"


def register() -> None:
    """Register the connector name once (vLLM may load plugins more than once)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
