"""LMCacheFSConnector: the vLLM KV connector facade.

vLLM builds one instance per process: the SCHEDULER role (in EngineCore)
gets a :class:`SchedulerSide` that keeps books, the WORKER role a
:class:`WorkerSide` that moves bytes, both built by :class:`LMCacheFSSpec`
(``connector/spec.py``); this class only forwards calls.

    vllm serve MODEL --kv-transfer-config \\
      '{"kv_connector":"LMCacheFSConnector","kv_role":"kv_both",
        "kv_connector_extra_config":{"storage_path":"/shared/kv"}}'
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from lmcache_fs import __version__
from lmcache_fs.config import ConfigError, TriState, load_config
from lmcache_fs.log import init_logging
from lmcache_fs.ops.eviction import BackgroundEvictor

from .directory_health import DirectoryHealth
from .metadata import LMCacheFSMetadata
from .scheduler import SchedulerSide
from .spec import LMCacheFSSpec
from .stats import LMCacheFSPromMetrics, LMCacheFSStats
from .vllm_compat import log_vllm_version
from .worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import KVTransferConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import PromMetric, PromMetricT
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("lmcache_fs.connector")


class LMCacheFSConnector(KVConnectorBase_V1, SupportsHMA):
    """Shares prefix KV between vLLM instances through one directory.

    ``SupportsHMA``: vLLM keeps its hybrid KV cache manager on; each KV cache
    group gets its own chunk files (see ``connector/groups.py``).
    """

    _cache_hit_source = CacheHitSource.DISK

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """True with ``layerwise_load: true``: a full CUDA graph replay skips
        ``wait_for_layer_load``, so layers would run before their KV is in place."""
        try:
            return load_config(extra_config or {}).layerwise_load is TriState.TRUE
        except ConfigError:
            return False  # the connector itself refuses the configuration, with the fix

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        init_logging(inside_vllm=True)
        if role == KVConnectorRole.SCHEDULER:
            log_vllm_version(__version__)
        spec = LMCacheFSSpec(vllm_config, kv_cache_config)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._evictor: BackgroundEvictor | None = None
        self._health: DirectoryHealth | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._adopt_recompute_policy()
            self._scheduler, self._evictor = spec.scheduler_side()
            self._health = DirectoryHealth(spec.breaker)
        else:
            self._worker = spec.worker_side()

    def _adopt_recompute_policy(self) -> None:
        # A bad chunk file must cost a recompute, never a failed request. vLLM's
        # default policy is "fail"; the scheduler reads it after building us.
        transfer = self._kv_transfer_config
        if transfer.kv_load_failure_policy != "recompute":
            logger.info("setting kv_load_failure_policy=recompute (was %r): an unreadable chunk "
                        "file is recomputed instead of failing the request",
                        transfer.kv_load_failure_policy)
            transfer.kv_load_failure_policy = "recompute"

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: "KVTransferConfig") -> bool:
        """vLLM 0.33+: yes. The KV cache keeps its addresses across sleep, so the views a
        worker registered stay valid (see :meth:`unregister_kv_caches`)."""
        return True

    # ============================== worker side ==============================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def unregister_kv_caches(self) -> None:
        """vLLM 0.33+, before sleep: no read or device copy may still use the KV cache."""
        assert self._worker is not None
        self._worker.quiesce()

    def restore_kv_caches(self) -> None:
        """vLLM 0.33+, after wake-up: nothing to redo (the registered views are still valid;
        the KV they hold was discarded, and vLLM's prefix cache forgot it too)."""

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, LMCacheFSMetadata)
        self._worker.load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        assert self._worker is not None
        self._worker.wait_for_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: "AttentionMetadata", **kwargs: Any) -> None:
        return  # whole chunks are gathered after the forward pass, in wait_for_save

    def wait_for_save(self) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, LMCacheFSMetadata)
        self._worker.save(meta)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self._worker is not None
        return self._worker.transfer_results()

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        return self._worker.take_failed_blocks()

    def get_kv_connector_stats(self) -> LMCacheFSStats | None:
        if self._health is not None:  # the scheduler side: its breaker's counts
            return self._health.take_stats()
        return self._worker.take_stats() if self._worker is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> LMCacheFSStats:
        return LMCacheFSStats(data=data) if data else LMCacheFSStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config: "VllmConfig",
                           metric_types: dict[type["PromMetric"], type["PromMetricT"]],
                           labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> LMCacheFSPromMetrics:
        """The ``vllm:lmcache_fs_*`` series on the API server's ``/metrics`` (see stats.py)."""
        return LMCacheFSPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._evictor is not None:
            self._evictor.stop()
        if self._scheduler is not None:
            for index in self._scheduler.indexes:
                index.stop_watching()

    # ============================= scheduler side ============================

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        hit = self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)
        return hit, self._scheduler.async_loads and hit > 0

    def may_load_async(self, request: "Request") -> bool:
        """vLLM 0.34: whether the lookup may answer ``load_kv_async``; only engines of several
        KV cache groups load asynchronously, and only a request whose first chunk is on disk.
        With ``--max-num-inflight-kv-loads`` such loads may start while the batch is full."""
        return self._scheduler is not None and self._scheduler.async_loads and \
            self._scheduler.may_hit(request)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        assert self._scheduler is not None and self._health is not None
        self._health.heard_from_workers(connector_output.kv_connector_stats)
        self._scheduler.loads_failed(connector_output.invalid_block_ids)
        if self._scheduler.async_loads:
            self._scheduler.async_loads_done(connector_output.finished_recving or set(),
                                             connector_output.failed_recving or set())

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        self._scheduler.request_finished(request)
        return False, None

    def request_finished_all_groups(self, request: "Request", block_ids: tuple[list[int], ...]
                                    ) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's call with the hybrid manager on: chunks were stored as they were computed."""
        return self.request_finished(request, block_ids[0] if block_ids else [])
