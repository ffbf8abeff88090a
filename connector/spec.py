"""Builds the connector's two sides from the settings and vLLM's configs.

vLLM builds one connector per process and role. Both roles start from one
:class:`LMCacheFSSpec`: the settings, the refusal of engines lmcache-fs cannot
serve faithfully, and one namespace per KV cache group. The scheduler role
then gets a :class:`SchedulerSide` over the indexes of every rank's files
(and, on engines that store, the evictor); a worker gets a :class:`WorkerSide`
over its own rank's files. (vLLM's ``OffloadingSpec`` plays the same part for
its ``OffloadingConnector``.)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lmcache_fs.config import LMCacheFSConfig, load_config
from lmcache_fs.ops.eviction import BackgroundEvictor, start_background_evictor
from lmcache_fs.storage.breaker import DirectoryUnavailable, breaker_for
from lmcache_fs.storage.index import ChunkIndex
from lmcache_fs.storage.integrity import key_id
from lmcache_fs.storage.layout import ChunkLayout
from lmcache_fs.storage.manifest import write_manifest
from lmcache_fs.storage.space import FreeSpaceGuard
from lmcache_fs.storage.store import ChunkStore
from lmcache_fs.storage.usage import BudgetGuard
from lmcache_fs.transfer.open_files import raise_open_files_limit

from .group_worker import GroupFiles, WorkerContext
from .groups import geometry_of
from .namespace import check_hash_seed, namespace_fields, rank_namespace
from .ranks import any_rank_of, this_rank_only
from .scheduler import GroupIndexes, SchedulerSide
from .supported import check_supported
from .worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = logging.getLogger("lmcache_fs.connector")


class LMCacheFSSpec:
    """What both roles derive from the settings and vLLM's configs, checked once.

    Raises (on construction):
        ConfigError: the settings are wrong, the storage path is unusable for the
            role, or the engine is one lmcache-fs refuses (each names the fix).
    """

    def __init__(self, vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig"):
        transfer = vllm_config.kv_transfer_config
        self.config: LMCacheFSConfig = load_config(transfer.kv_connector_extra_config or {})
        self.kv_role = transfer.kv_role
        self.can_load = transfer.kv_role in ("kv_both", "kv_consumer")
        self.can_save = transfer.kv_role in ("kv_both", "kv_producer")
        self.breaker = breaker_for(self.config.storage_path, **self.config.breaker_settings())
        self.root = self._check_storage_path()
        check_supported(kv_cache_config, vllm_config.parallel_config,
                        vllm_config.speculative_config)
        self.kv_cache_config = kv_cache_config
        self.parallel = vllm_config.parallel_config
        self.block_size = int(kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size)
        self.hash_block_size = int(kv_cache_config.hash_block_size or self.block_size)
        self.config.check_block_size(self.block_size)
        self.config.check_block_size(self.hash_block_size)
        self.mac_key = self.config.integrity_key()
        # One namespace per KV cache group (one in all for a plain full-attention model).
        self.group_fields = [namespace_fields(vllm_config, kv_cache_config, self.config.chunk_size, g)
                             for g in range(len(kv_cache_config.kv_cache_groups))]
        for fields in self.group_fields:
            if self.mac_key is not None:  # engines with different keys never share chunks
                fields["integrity_key_id"] = key_id(self.mac_key)
        self.geometries = [geometry_of(g.kv_cache_spec, self.config.chunk_size)
                           for g in kv_cache_config.kv_cache_groups]

    def _check_storage_path(self) -> Path:
        """The storage path, checked within the start-up deadline: a directory that does not
        answer (a hung NFS server) starts the engine with the directory switched off."""
        try:
            return self.breaker.call(self.config.check_storage_path, self.can_save,
                                     deadline_s=self.config.startup_deadline_s,
                                     what="start-up check")
        except DirectoryUnavailable:
            logger.warning("storage_path %s did not answer at start-up: this engine serves "
                           "without the cache until it does", self.config.storage_path)
            return Path(self.config.storage_path)

    def _at_start_up(self, what: str, fn: Callable[..., object], *args: object) -> None:
        """One start-up write to the directory (a manifest, a marker), bounded by the start-up
        deadline; one that fails or times out is logged, the engine starts all the same."""
        if not self.breaker.available:
            return
        try:
            self.breaker.call(fn, *args, deadline_s=self.config.startup_deadline_s, what=what)
        except OSError as exc:
            logger.warning("%s in %s failed (%s): the engine starts without it", what,
                           self.root, exc.strerror or exc)

    def scheduler_side(self) -> tuple[SchedulerSide, BackgroundEvictor | None]:
        """The scheduler role: every rank's index of every group (scanned, watched), and
        the evictor of an engine that stores (None without a budget or stores)."""
        cfg = self.config
        groups = [GroupIndexes(geometry, [
            ChunkIndex(ChunkLayout(self.root, rank_namespace(fields, tp, pp)),
                       cfg.lookup_negative_ttl_s, breaker=self.breaker,
                       lookup_deadline_s=cfg.lookup_deadline_ms / 1e3)
            for pp in range(self.parallel.pipeline_parallel_size)
            for tp in range(self.parallel.tensor_parallel_size)])
            for fields, geometry in zip(self.group_fields, self.geometries)]
        # Scanned in the background: a start-up never waits for the directory (a restarted
        # engine finds its chunks by their paths until the scan is done).
        for group in groups:
            for index in group.indexes:
                index.scan_in_background(watch=cfg.watch_events)
        self._at_start_up("hash-seed check", check_hash_seed, groups[0].indexes[0].layout.directory,
                          str(self.group_fields[0]["hash_algo"]))
        scheduler = SchedulerSide(groups, cfg.chunk_size, self.block_size, self.hash_block_size,
                                  self.can_load, self.can_save)
        # With a budget, one evictor per engine that stores; the lease picks who works.
        evictor = (start_background_evictor(cfg, scheduler.forget, self.breaker)
                   if self.can_save else None)
        return scheduler, evictor

    def worker_side(self) -> WorkerSide:
        """The worker role: this rank's store, readers and writer of each group."""
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group

        raise_open_files_limit()  # a layer-wise load keeps a step's chunks open
        cfg = self.config
        tp_group = get_tp_group()
        # One set of guards for this worker's groups: their writers share the budget's count.
        guards = (FreeSpaceGuard(self.root, int(cfg.min_free_disk_gb * 1e9)),
                  BudgetGuard(self.root, int(cfg.max_disk_size_gb * 1e9)))
        any_rank = any_rank_of(tp_group.cpu_group) if tp_group.world_size > 1 else this_rank_only
        context = WorkerContext(cfg, self.block_size, self.can_save, guards, any_rank,
                                self.breaker)
        # Hit tokens are counted once: by the first full-attention group's loads, on
        # tensor-parallel rank 0 (vLLM sums the stats of every group and every rank).
        counting_group = next((g for g, geo in enumerate(self.geometries) if geo.kind == "full"), 0)
        groups = []
        for g, (fields, geometry) in enumerate(zip(self.group_fields, self.geometries)):
            layout = ChunkLayout(self.root, rank_namespace(fields, tp_group.rank_in_group,
                                                           get_pp_group().rank_in_group))
            if self.can_save:
                self._at_start_up("namespace.json", write_manifest, layout, cfg.file_mode)
            groups.append(GroupFiles(
                ChunkStore(layout, cfg.file_mode, mac_key=self.mac_key),
                self.kv_cache_config.kv_cache_groups[g].layer_names, geometry.held_blocks,
                counts_tokens=g == counting_group and tp_group.rank_in_group == 0,
                holds_states=geometry.kind == "state"))
        return WorkerSide(context, groups)
