"""The vLLM releases lmcache-fs supports, and what differs between them, in one place.

The rest of ``connector/`` is written against the API these releases share and
asks this module wherever they differ; no other module checks a version.
``tests/test_vllm_contract.py`` reads the published sources of every release in
:data:`TESTED_RELEASES` (never installing them) and checks each entry of
:data:`CHANGES`, every vLLM name, field and method the adapter uses, and that
the block-hash functions behind chunk keys are unchanged. Supporting the next
release starts with adding it to :data:`TESTED_RELEASES`.

What each release changed, and what lmcache-fs does about it:

- 0.33: ``supports_sleep_mode()`` (True unless a connector says no) and
  ``unregister_kv_caches()`` / ``restore_kv_caches()`` around sleep and
  wake-up. lmcache-fs supports sleep mode: vLLM keeps the KV cache's virtual
  addresses across sleep, so the views a worker registered stay valid, and a
  worker finishes its reads and device copies before vLLM releases the memory.
- 0.33: with a speculative decoder, the model runner collects transfer results
  and stats before ``wait_for_save``. Every worker hook ends the step's reads
  first and the save path's state does not depend on that order. Drafters that
  keep a KV cache of their own (EAGLE, MTP, draft models) are refused at
  start-up (``drafter_keeps_kv``): their KV at a chunk's last positions depends
  on tokens past the chunk; n-gram and suffix drafters keep none.
- 0.34: ``CachedRequestData`` lost ``resumed_req_ids`` (and ``all_token_ids``):
  a preempted request that runs again is sent in full in ``scheduled_new_reqs``
  and cached requests' ``new_block_ids`` are append-only (``resumed_requests``).
- 0.34: ``may_load_async(request)``: engines that load asynchronously (several
  KV cache groups) answer it, so under ``--max-num-inflight-kv-loads`` their
  loads may start while the running batch is full.
- 0.34: ``MambaSpec.state_alignment``: each state of a linear-attention layer
  starts at a multiple of it within the page (``state_alignment``; 1, packed, is
  what earlier releases do). It is part of a state group's namespace.
- 0.34: ``kv_cache_access()`` (default in-process, which is how workers use the
  tensors), ``supports_lookahead_block_hashes()`` (default False: block hashes,
  and so chunk keys, stay the prompt's own; opting in would make a block's hash
  cover a drafter's lookahead tokens, for drafters lmcache-fs refuses), the
  extensible KV cache allocation on CUDA (its views keep their addresses) and
  the V2 GPU model runner only (the same hooks; synchronous loads still start
  before the forward pass).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Collection

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import CachedRequestData

logger = logging.getLogger(__name__)

TESTED_RELEASES = ("0.32.0", "0.33.0", "0.34.0")
"""The vLLM releases whose sources the contract test checks (0.32 also runs the engine tests,
on vLLM's CPU build; no CPU build of a later release exists)."""


@dataclass(frozen=True)
class Change:
    """One difference between releases that the adapter depends on."""

    release: str
    """The first release with the change."""
    module: str
    """The source file of the changed class, under the wheel's root."""
    owner: str
    member: str
    added: bool
    """True: ``member`` exists from ``release`` on; False: it is gone from ``release`` on."""


_BASE = "vllm/distributed/kv_transfer/kv_connector/v1/base.py"
_SCHED_OUTPUT = "vllm/v1/core/sched/output.py"
_KV_CACHE_INTERFACE = "vllm/v1/kv_cache_interface.py"

CHANGES = (
    Change("0.33.0", _BASE, "KVConnectorBase_V1", "supports_sleep_mode", added=True),
    Change("0.33.0", _BASE, "KVConnectorBase_V1", "unregister_kv_caches", added=True),
    Change("0.33.0", _BASE, "KVConnectorBase_V1", "restore_kv_caches", added=True),
    Change("0.34.0", _BASE, "KVConnectorBase_V1", "may_load_async", added=True),
    Change("0.34.0", _SCHED_OUTPUT, "CachedRequestData", "resumed_req_ids", added=False),
    Change("0.34.0", _KV_CACHE_INTERFACE, "MambaSpec", "state_alignment", added=True),
)


def resumed_requests(cached: "CachedRequestData") -> Collection[str]:
    """Cached requests of this step that run again after a preemption.

    0.32 and 0.33 list them in ``resumed_req_ids`` and send their whole block
    table in ``new_block_ids``; from 0.34 they come in ``scheduled_new_reqs``
    instead, so no cached request is resumed.
    """
    return getattr(cached, "resumed_req_ids", ())


def state_alignment(spec: Any) -> int:
    """The byte alignment of each state within a linear-attention page: vLLM 0.34's
    ``MambaSpec.state_alignment``, or 1 (states packed back to back) before it."""
    return int(getattr(spec, "state_alignment", 1))


def drafter_keeps_kv(speculative_config: Any) -> bool:
    """True if the engine's speculative decoder keeps a KV cache of its own."""
    return speculative_config is not None and bool(speculative_config.uses_draft_kv_cache())


def _minor(version: str) -> tuple[int, int]:
    from packaging.version import Version  # (a dependency of vLLM itself)

    release = Version(version).release
    return release[0], release[1] if len(release) > 1 else 0


def log_vllm_version(lmcache_fs_version: str) -> str:
    """Log the running vLLM in the start-up line; one WARNING if it is outside the tested range.

    Never refuses: a newer vLLM may work, and the warning names what was tested.
    """
    import vllm

    running = vllm.__version__
    tested = f"{TESTED_RELEASES[0]} to {TESTED_RELEASES[-1]}"
    logger.info("lmcache-fs %s on vLLM %s (tested with vLLM %s)", lmcache_fs_version, running,
                tested)
    if not _minor(TESTED_RELEASES[0]) <= _minor(running) <= _minor(TESTED_RELEASES[-1]):
        logger.warning("vLLM %s is outside the releases lmcache-fs was tested with (%s): it "
                       "should work, but if the engine fails, install a tested vLLM or a "
                       "newer lmcache-fs", running, tested)
    return running
