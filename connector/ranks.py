"""What the tensor-parallel ranks of one engine must agree on within a step."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist


def any_rank_of(group: Any) -> Callable[[Sequence[bool]], list[bool]]:
    """A function that returns, on every rank of ``group``, for each position of the
    flags it is passed, whether any rank passed True there.

    ``group`` is a CPU (gloo) process group, e.g. vLLM's ``get_tp_group().cpu_group``:
    one all-reduce of one integer per flag (a step's loads: about 0.1 ms), only in
    steps that load. Every rank must call it in the same steps with as many flags
    (they all get the same metadata).
    """
    def any_rank(flags: Sequence[bool]) -> list[bool]:
        value = torch.tensor([int(flag) for flag in flags], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        return [bool(v) for v in value.tolist()]

    return any_rank


def this_rank_only(flags: Sequence[bool]) -> list[bool]:
    """What :func:`any_rank_of` gives an engine of one rank: its own flags."""
    return list(flags)
