"""Per-batch code statistics a quantizer keeps while it trains: counts, perplexity and usage on the device."""
from __future__ import annotations

import torch


def code_counts(indices: torch.Tensor, num_codes: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """How often each of ``num_codes`` codes occurs in ``indices`` (any shape). A scatter-add, not ``bincount``,
    whose CUDA kernel reads the largest index back to the host (a sync in every training step)."""
    flat = indices.reshape(-1)
    return torch.zeros(num_codes, dtype=dtype, device=flat.device).index_add_(0, flat, torch.ones_like(flat, dtype=dtype))


def step_stats(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Perplexity and usage of one step's ``counts`` as 0-dim tensors on their device: no host sync, so a
    training step can report them and the trainer reads them only when it logs."""
    p = counts / counts.sum().clamp_min(1)
    h = -(p * p.clamp_min(1e-300).log()).sum()  # 0 log 0 = 0
    return {"perplexity": h.exp(), "usage": (counts > 0).double().mean()}
