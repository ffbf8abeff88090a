"""What the tensor-parallel ranks of one engine must agree on within a step."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist


def any_rank_of(group: Any) -> Callable[[bool], bool]:
    """A function that returns, on every rank of ``group``, whether any rank passed True.

    ``group`` is a CPU (gloo) process group, e.g. vLLM's ``get_tp_group().cpu_group``:
    one all-reduce of one integer, about 0.1 ms, only in steps that load. Every
    rank must call it in the same steps (they all get the same metadata).
    """
    def any_rank(flag: bool) -> bool:
        value = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        return bool(value.item())

    return any_rank


def this_rank_only(flag: bool) -> bool:
    """What :func:`any_rank_of` gives an engine of one rank: its own flag."""
    return flag
