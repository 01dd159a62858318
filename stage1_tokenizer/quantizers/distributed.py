"""torch.distributed helpers for state changed outside autograd; no-ops in a single process."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (returns it)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` on every rank with rank ``src``'s value (returns it)."""
    if is_distributed():
        dist.broadcast(t, src=src)
    return t


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate the rows of ``t`` from every rank (equal shapes assumed), in rank order."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)
