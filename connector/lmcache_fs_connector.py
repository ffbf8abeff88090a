"""LMCacheFSConnector: the vLLM KV connector facade.

vLLM builds one instance per process: the SCHEDULER role (in EngineCore)
builds a :class:`SchedulerSide` that keeps books, the WORKER role builds a
:class:`WorkerSide` that moves bytes; this class only forwards calls.

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
)
from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from lmcache_fs.config import ConfigError, LMCacheFSConfig, load_config
from lmcache_fs.log import init_logging
from lmcache_fs.ops.eviction import BackgroundEvictor, start_background_evictor
from lmcache_fs.storage.index import ChunkIndex
from lmcache_fs.storage.integrity import key_id
from lmcache_fs.storage.layout import ChunkLayout
from lmcache_fs.storage.space import FreeSpaceGuard
from lmcache_fs.storage.store import ChunkStore

from .metadata import LMCacheFSMetadata
from .namespace import check_hash_seed, namespace_fields, rank_namespace
from .ranks import any_rank_of
from .scheduler import SchedulerSide
from .stats import LMCacheFSPromMetrics, LMCacheFSStats
from .worker import ReadOptions, WorkerSide, this_rank_only

if TYPE_CHECKING:
    from vllm.config import ParallelConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import PromMetric, PromMetricT
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("lmcache_fs.connector")


def check_supported(kv_cache_config: "KVCacheConfig", parallel: "ParallelConfig") -> None:
    """Refuse engines whose KV lmcache-fs could not store and load faithfully.

    - Several KV cache groups (hybrid attention): one chunk file per key holds one group.
    - Sliding-window or chunked-local attention: vLLM puts its null block in place
      of blocks that left the window; a chunk gathered from them would be stored
      under its real key and loaded by another engine as KV.
    - Pipeline parallelism: a stage whose load fails cannot tell the others before
      they store what they computed over it (vLLM keeps several steps in flight).
    - Context parallelism: each rank holds only some tokens of a block.

    Raises:
        ConfigError: naming the reason and the fix.
    """
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ConfigError(f"lmcache-fs supports models with one KV cache group; this one has "
                          f"{len(groups)} (hybrid attention): remove the kv-transfer-config")
    spec = groups[0].kv_cache_spec
    inner = getattr(spec, "kv_cache_specs", None)  # UniformTypeKVCacheSpecs: one per layer
    for one in (inner.values() if inner else [spec]):
        if type(one) not in (FullAttentionSpec, MLAAttentionSpec):
            raise ConfigError(f"lmcache-fs stores full-attention KV only; this model's KV cache is "
                              f"{type(one).__name__} (attention that keeps only some blocks of the "
                              "prompt): remove the kv-transfer-config")
    if parallel.pipeline_parallel_size > 1:
        raise ConfigError(f"lmcache-fs does not support pipeline parallelism (pipeline_parallel_size="
                          f"{parallel.pipeline_parallel_size}): a failed load on one stage could leave "
                          "wrong KV stored by the others; use tensor parallelism, or remove the "
                          "kv-transfer-config")
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        # Context parallelism spreads a block's tokens over ranks: vLLM's scheduler blocks
        # are then larger than the KV cache's, which chunk keys and block copies assume equal.
        if getattr(parallel, name, 1) > 1:
            raise ConfigError(f"lmcache-fs does not support context parallelism ({name}="
                              f"{getattr(parallel, name)}): set it to 1, or remove the "
                              "kv-transfer-config")


class LMCacheFSConnector(KVConnectorBase_V1):
    """Shares prefix KV between vLLM instances through one directory."""

    _cache_hit_source = CacheHitSource.DISK

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """True with ``layerwise_load: true``: a full CUDA graph replay skips
        ``wait_for_layer_load``, so layers would run before their KV is in place."""
        try:
            return load_config(extra_config or {}).layerwise_load == "true"
        except ConfigError:
            return False  # the connector itself refuses the configuration, with the fix

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        init_logging(inside_vllm=True)
        transfer = self._kv_transfer_config
        self.config: LMCacheFSConfig = load_config(transfer.kv_connector_extra_config or {})
        can_load = transfer.kv_role in ("kv_both", "kv_consumer")
        can_save = transfer.kv_role in ("kv_both", "kv_producer")
        root = self.config.check_storage_path(writable=can_save)

        check_supported(kv_cache_config, vllm_config.parallel_config)
        group = kv_cache_config.kv_cache_groups[0]
        spec = group.kv_cache_spec
        block_size = int(spec.block_size)
        hash_block_size = int(kv_cache_config.hash_block_size or block_size)
        self.config.check_block_size(block_size)
        self.config.check_block_size(hash_block_size)
        fields = namespace_fields(vllm_config, kv_cache_config, self.config.chunk_size)
        mac_key = self.config.integrity_key()
        if mac_key is not None:  # engines with different keys never share chunks
            fields["integrity_key_id"] = key_id(mac_key)
        parallel = vllm_config.parallel_config

        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._evictor: BackgroundEvictor | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._adopt_recompute_policy()
            layouts = [ChunkLayout(root, rank_namespace(fields, tp, pp))
                       for pp in range(parallel.pipeline_parallel_size)
                       for tp in range(parallel.tensor_parallel_size)]
            indexes = [ChunkIndex(layout, self.config.lookup_negative_ttl_s) for layout in layouts]
            for index in indexes:
                found = index.scan()
                if self.config.watch_events:
                    index.start_watching()
                logger.info("namespace %s: %d chunks found at start-up in %s (role %s)",
                            index.layout.namespace.name, found, root, transfer.kv_role)
            check_hash_seed(layouts[0].directory, str(fields["hash_algo"]))
            self._scheduler = SchedulerSide(indexes, self.config.chunk_size, block_size,
                                            hash_block_size, can_load, can_save)
            if can_save:  # with a budget, one evictor per engine; the lease picks who works
                self._evictor = start_background_evictor(self.config, self._scheduler.forget)
        else:
            from vllm.distributed.parallel_state import get_pp_group, get_tp_group

            tp_group = get_tp_group()
            layout = ChunkLayout(root, rank_namespace(fields, tp_group.rank_in_group,
                                                      get_pp_group().rank_in_group))
            if can_save:
                layout.write_manifest()
            cfg = self.config
            self._worker = WorkerSide(
                ChunkStore(layout, cfg.file_mode, mac_key=mac_key), group.layer_names,
                cfg.chunk_size // block_size, block_size, cfg.save_queue_size, can_save,
                ReadOptions(cfg.use_gds, cfg.staging_buffer_mb << 20, cfg.verify_device_reads,
                            cfg.layerwise_load),
                FreeSpaceGuard(root, int(cfg.min_free_disk_gb * 1e9)),
                any_rank_of(tp_group.cpu_group) if tp_group.world_size > 1 else this_rank_only)

    def _adopt_recompute_policy(self) -> None:
        # A bad chunk file must cost a recompute, never a failed request. vLLM's
        # default policy is "fail"; the scheduler reads it after building us.
        transfer = self._kv_transfer_config
        if transfer.kv_load_failure_policy != "recompute":
            logger.info("setting kv_load_failure_policy=recompute (was %r): an unreadable chunk "
                        "file is recomputed instead of failing the request",
                        transfer.kv_load_failure_policy)
            transfer.kv_load_failure_policy = "recompute"

    # ============================== worker side ==============================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

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

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        return self._worker.take_failed_blocks()

    def get_kv_connector_stats(self) -> LMCacheFSStats | None:
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
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        assert self._scheduler is not None
        self._scheduler.loads_failed(connector_output.invalid_block_ids)

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        self._scheduler.request_finished(request)
        return False, None
