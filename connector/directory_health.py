"""The scheduler's view of the cache directory's health: its own breaker, and what the workers saw.

The scheduler process and each worker process have a breaker of their own
(:mod:`lmcache_fs.storage.breaker`): they share no memory. The scheduler's trips
when a lookup's stat passes its deadline, but a hit whose keys it already
holds needs no stat, so a directory that stops answering in the middle of a
load is seen first by a worker. Workers report their trips in their stats,
which vLLM hands to the scheduler each step: a trip there switches the
scheduler's breaker off too, so it stops planning loads that could only fail
(every lookup is a miss) until its own probe finds the directory answering.
"""

from __future__ import annotations

from lmcache_fs.storage.breaker import Breaker

from .stats import DirectoryReport, LMCacheFSStats


class DirectoryHealth:
    """The scheduler side's breaker, fed by the workers' reports."""

    def __init__(self, breaker: Breaker):
        self.breaker = breaker
        self._report = DirectoryReport(breaker)

    def heard_from_workers(self, stats: object) -> None:
        """The workers' stats of a step (None, or :class:`LMCacheFSStats` data)."""
        data = getattr(stats, "data", None) or {}
        if data.get("directory_trips"):
            self.breaker.switch_off("a worker's load or store timed out or failed as an outage does")

    def take_stats(self) -> LMCacheFSStats | None:
        """What the scheduler's breaker counted since the last call; None if nothing."""
        stats = LMCacheFSStats()
        self._report.take(stats)
        return None if stats.is_empty() else stats
