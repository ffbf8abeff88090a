"""Tensor-parallel ranks agree on which loads failed within the step (a real gloo all-reduce)."""

import multiprocessing
import os

import pytest

pytest.importorskip("vllm")


def _rank(rank: int, init_file: str, flags: list[list[bool]], results) -> None:
    import torch.distributed as dist
    from lmcache_fs.connector.ranks import any_rank_of

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    any_rank = any_rank_of(dist.group.WORLD)
    results.put((rank, [any_rank(step) for step in flags]))
    results.close()
    results.join_thread()  # the answer has left this process
    # Tearing gloo down while the other rank still talks to it can abort (SIGABRT) in
    # gloo's own threads: the answer is out, so leave without tearing anything down.
    os._exit(0)


def test_every_rank_learns_which_loads_failed_on_any_rank(tmp_path):
    # Per step: the flags of rank 0's two loads, then those of rank 1's.
    steps = [((False, False), (False, False)), ((True, False), (False, False)),
             ((False, False), (False, True)), ((True, False), (True, True))]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "init"), [s[r] for s in steps],
                                             results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected = [[a or b for a, b in zip(*s)] for s in steps]
    assert got == {0: expected, 1: expected}
