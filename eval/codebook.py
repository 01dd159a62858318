"""Codebook health from code indices: usage, perplexity (DiVeQ Eq. 15), distortion per bit (Eq. 17)."""
from __future__ import annotations

import math

import torch


def code_counts(indices: torch.Tensor, num_codes: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """How often each of ``num_codes`` codes occurs in ``indices`` (any shape). A scatter-add, not ``bincount``,
    whose CUDA kernel reads the largest index back to the host (a sync in every training step)."""
    flat = indices.reshape(-1)
    return torch.zeros(num_codes, dtype=dtype, device=flat.device).index_add_(0, flat, torch.ones_like(flat, dtype=dtype))


def entropy(counts: torch.Tensor, base: float = math.e) -> float:
    """Entropy of the code distribution given by ``counts``; 0 for an empty count."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * p.log()).sum() / math.log(base))


def perplexity(counts: torch.Tensor) -> float:
    """exp(H), H = -sum p_k log p_k (DiVeQ Eq. 15)."""
    return math.exp(entropy(counts))


def usage(counts: torch.Tensor) -> float:
    """Fraction of codes selected at least once."""
    return float((counts > 0).double().mean())


def step_stats(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Perplexity and usage of one step's ``counts`` as 0-dim tensors on their device: no host sync, so a
    training step can report them and the trainer reads them only when it logs."""
    p = counts / counts.sum().clamp_min(1)
    h = -(p * p.clamp_min(1e-300).log()).sum()  # 0 log 0 = 0
    return {"perplexity": h.exp(), "usage": (counts > 0).double().mean()}


MIN_TOKENS_PER_CODE = math.log(10)  # K ln 10 ~ 2.3 K tokens: uniform use then reaches 90% usage


def usage_ceiling(num_tokens: float, num_codes: int) -> float:
    """``1 - e^(-T/K)``: the usage even perfectly uniform code use reaches on ``T`` tokens (expected value)."""
    return 1.0 - math.exp(-num_tokens / num_codes)


def distortion_per_bit(mse: float, counts: torch.Tensor) -> float:
    """D / H2 (DiVeQ Eq. 17): mean squared quantisation error per bit of code entropy."""
    bits = entropy(counts, base=2.0)
    return float("inf") if bits == 0 else mse / bits
