"""vLLM finds the connector by name alone (plugin entry point) and by explicit module path."""

import pytest

pytest.importorskip("vllm")

from vllm.config import KVTransferConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.plugins import load_general_plugins  # noqa: E402

from lmcache_fs.connector import LMCacheFSConnector  # noqa: E402
from lmcache_fs.connector.plugin import register  # noqa: E402


def test_installed_plugin_registers_the_name():
    load_general_plugins()
    config = KVTransferConfig(kv_connector="LMCacheFSConnector", kv_role="kv_both")
    assert KVConnectorFactory.get_connector_class(config) is LMCacheFSConnector


def test_registering_twice_is_harmless():
    register()
    register()
    config = KVTransferConfig(kv_connector="LMCacheFSConnector", kv_role="kv_both")
    assert KVConnectorFactory.get_connector_class(config) is LMCacheFSConnector


def test_explicit_module_path_works():
    config = KVTransferConfig(kv_connector="LMCacheFSConnector", kv_role="kv_both",
                              kv_connector_module_path="lmcache_fs.connector")
    assert KVConnectorFactory.get_connector_class(config) is LMCacheFSConnector
