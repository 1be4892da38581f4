"""What every process calls together so that all of them decide alike: one rank's answer for all, or every rank's
answer for each. Each is a no-op with one process or without a process group."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def all_ranks(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order. A collective: every rank calls it."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def from_rank_0(work: Callable[[], Any]) -> Any:
    """What `work`, run on rank 0 alone, returns (or raises) on every rank; so that all ranks decide alike even where
    a shared filesystem shows them different listings for a moment. A collective: every rank calls it."""
    if not is_distributed():
        return work()
    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome = [(work(), None)]
        except Exception as error:
            outcome = [(None, error)]
    dist.broadcast_object_list(outcome, src=0)
    value, error = outcome[0]
    if error is not None:
        raise error
    return value
