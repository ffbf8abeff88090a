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
    KVConnectorTransferResults,
    SupportsHMA,
)
from vllm.v1.kv_cache_interface import (
    ChunkedLocalAttentionSpec,
    FullAttentionSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from lmcache_fs import __version__
from lmcache_fs.config import ConfigError, LMCacheFSConfig, load_config
from lmcache_fs.log import init_logging
from lmcache_fs.ops.eviction import BackgroundEvictor, start_background_evictor
from lmcache_fs.storage.index import ChunkIndex
from lmcache_fs.storage.integrity import key_id
from lmcache_fs.storage.layout import ChunkLayout
from lmcache_fs.storage.space import FreeSpaceGuard
from lmcache_fs.storage.store import ChunkStore
from lmcache_fs.storage.usage import BudgetGuard
from lmcache_fs.transfer.open_files import raise_open_files_limit

from .groups import geometry_of
from .hybrid import GroupedWorkers
from .metadata import LMCacheFSMetadata
from .namespace import (
    check_hash_seed,
    is_plain_full_attention,
    layer_specs,
    namespace_fields,
    rank_namespace,
)
from .ranks import any_rank_of
from .scheduler import SchedulerSide
from .stats import LMCacheFSPromMetrics, LMCacheFSStats
from .vllm_compat import drafter_keeps_kv, log_vllm_version
from .worker import ReadOptions, WorkerSide, this_rank_only

if TYPE_CHECKING:
    from vllm.config import KVTransferConfig, ParallelConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import PromMetric, PromMetricT
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("lmcache_fs.connector")


# KV cache specs whose blocks lmcache-fs stores (see connector/groups.py). Exact types:
# a subclass (sink attention, sliding-window MLA...) keeps KV these rules do not describe.
_STORED_SPECS = (FullAttentionSpec, MLAAttentionSpec, SlidingWindowSpec, ChunkedLocalAttentionSpec)


def check_supported(kv_cache_config: "KVCacheConfig", parallel: "ParallelConfig",
                    speculative: Any = None) -> None:
    """Refuse engines whose KV lmcache-fs could not store and load faithfully.

    - KV cache groups other than full, sliding-window and chunked-local attention:
      Mamba and linear-attention layers keep a recurrent state, not per-token
      blocks; lmcache-fs stores none.
    - Groups of different block sizes: one chunk spans the same blocks in every group.
    - Pipeline parallelism: a stage whose load fails cannot tell the others before
      they store what they computed over it (vLLM keeps several steps in flight).
    - Context parallelism: each rank holds only some tokens of a block.
    - A speculative decoder with a KV cache of its own (EAGLE, MTP, a draft model):
      its KV at a chunk's last positions depends on tokens past the chunk.

    Raises:
        ConfigError: naming the reason and the fix.
    """
    groups = kv_cache_config.kv_cache_groups
    for group in groups:
        for one in layer_specs(group.kv_cache_spec):
            if type(one) not in _STORED_SPECS:
                raise ConfigError(
                    f"lmcache-fs cannot store the KV cache of layer {group.layer_names[0]} "
                    f"({len(group.layer_names)} layers of this kind): its spec is "
                    f"{type(one).__name__} (a Mamba / linear-attention state or another kind lmcache-fs "
                    "does not store; it stores full, sliding-window and chunked-local attention): "
                    "remove the kv-transfer-config")
    block_sizes = {int(g.kv_cache_spec.block_size) for g in groups}
    if len(block_sizes) > 1:
        raise ConfigError(f"lmcache-fs needs one block size in every KV cache group; this engine "
                          f"has {sorted(block_sizes)}: set --block-size, or remove the "
                          "kv-transfer-config")
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
    if drafter_keeps_kv(speculative):
        raise ConfigError(f"lmcache-fs does not store the KV cache of a speculative decoder "
                          f"(method {speculative.method!r} keeps one: its KV at a chunk's end "
                          "depends on tokens past the chunk, which chunk keys do not cover): use "
                          "the 'ngram' or 'suffix' method, or remove the kv-transfer-config")


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

        if role == KVConnectorRole.SCHEDULER:
            log_vllm_version(__version__)
        check_supported(kv_cache_config, vllm_config.parallel_config,
                        vllm_config.speculative_config)
        group = kv_cache_config.kv_cache_groups[0]
        spec = group.kv_cache_spec
        block_size = int(spec.block_size)
        hash_block_size = int(kv_cache_config.hash_block_size or block_size)
        self.config.check_block_size(block_size)
        self.config.check_block_size(hash_block_size)
        mac_key = self.config.integrity_key()
        # One namespace per KV cache group (one in all for a plain full-attention model).
        group_fields = [namespace_fields(vllm_config, kv_cache_config, self.config.chunk_size, g)
                        for g in range(len(kv_cache_config.kv_cache_groups))]
        for fields in group_fields:
            if mac_key is not None:  # engines with different keys never share chunks
                fields["integrity_key_id"] = key_id(mac_key)
        fields = group_fields[0]
        self._hybrid = not is_plain_full_attention(kv_cache_config)
        geometries = [geometry_of(g.kv_cache_spec, self.config.chunk_size)
                      for g in kv_cache_config.kv_cache_groups]
        # vLLM takes failed loads of several groups per request only: load asynchronously.
        self._async_loads = len(kv_cache_config.kv_cache_groups) > 1
        parallel = vllm_config.parallel_config

        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | GroupedWorkers | None = None
        self._evictor: BackgroundEvictor | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._adopt_recompute_policy()
            group_indexes = [
                [ChunkIndex(ChunkLayout(root, rank_namespace(f, tp, pp)),
                            self.config.lookup_negative_ttl_s)
                 for pp in range(parallel.pipeline_parallel_size)
                 for tp in range(parallel.tensor_parallel_size)]
                for f in group_fields]
            indexes = [index for per_group in group_indexes for index in per_group]
            layouts = [index.layout for index in indexes]
            for index in indexes:
                found = index.scan()
                if self.config.watch_events:
                    index.start_watching()
                logger.info("namespace %s: %d chunks found at start-up in %s (role %s)",
                            index.layout.namespace.name, found, root, transfer.kv_role)
            check_hash_seed(layouts[0].directory, str(fields["hash_algo"]))
            self._scheduler = SchedulerSide(
                indexes, self.config.chunk_size, block_size, hash_block_size, can_load, can_save,
                list(zip(geometries, group_indexes)) if self._hybrid else ())
            if can_save:  # with a budget, one evictor per engine; the lease picks who works
                self._evictor = start_background_evictor(self.config, self._scheduler.forget)
        else:
            from vllm.distributed.parallel_state import get_pp_group, get_tp_group

            raise_open_files_limit()  # a layer-wise load keeps a step's chunks open
            tp_group = get_tp_group()
            cfg = self.config
            workers = []
            # Hit tokens are counted once: by the first full-attention group's loads, on
            # tensor-parallel rank 0 (vLLM sums the stats of every group and every rank).
            counting_group = next((g for g, geo in enumerate(geometries) if geo.kind == "full"), 0)
            # One set of guards for this worker's groups: their writers share the budget's count.
            guards = (FreeSpaceGuard(root, int(cfg.min_free_disk_gb * 1e9)),
                      BudgetGuard(root, int(cfg.max_disk_size_gb * 1e9)))
            read_options = ReadOptions(cfg.use_gds, cfg.staging_buffer_mb << 20,
                                       cfg.verify_device_reads, cfg.layerwise_load)
            any_rank = (any_rank_of(tp_group.cpu_group) if tp_group.world_size > 1
                        else this_rank_only)
            for g, (fields_g, geo) in enumerate(zip(group_fields, geometries)):
                layout = ChunkLayout(root, rank_namespace(fields_g, tp_group.rank_in_group,
                                                          get_pp_group().rank_in_group))
                if can_save:
                    layout.write_manifest(cfg.file_mode)
                workers.append(WorkerSide(
                    ChunkStore(layout, cfg.file_mode, mac_key=mac_key),
                    kv_cache_config.kv_cache_groups[g].layer_names,
                    geo.held_blocks, block_size, cfg.save_queue_size, can_save, read_options,
                    guards, any_rank,
                    async_loads=self._async_loads,
                    counts_tokens=g == counting_group and tp_group.rank_in_group == 0))
            self._worker = GroupedWorkers(workers) if self._async_loads else workers[0]

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
        if isinstance(self._worker, WorkerSide):  # asynchronous loads: for requests not running
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
        if isinstance(self._worker, GroupedWorkers):
            return self._worker.transfer_results()
        return super().get_transfer_results(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        if isinstance(self._worker, GroupedWorkers):
            return set()  # reported per request, in get_transfer_results
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
        hit = self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)
        return hit, self._async_loads and hit > 0

    def may_load_async(self, request: "Request") -> bool:
        """vLLM 0.34: whether the lookup may answer ``load_kv_async``; only engines of several
        KV cache groups load asynchronously, and only a request whose first chunk is on disk.
        With ``--max-num-inflight-kv-loads`` such loads may start while the batch is full."""
        return self._async_loads and self._scheduler is not None and \
            self._scheduler.may_hit(request)

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
        if self._async_loads:
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
