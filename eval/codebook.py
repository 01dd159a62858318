"""Codebook health from code indices: usage, perplexity (DiVeQ Eq. 15), distortion per bit (Eq. 17)."""
from __future__ import annotations

import math

import torch


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


MIN_TOKENS_PER_CODE = math.log(10)  # K ln 10 ~ 2.3 K tokens: uniform use then reaches 90% usage


def usage_ceiling(num_tokens: float, num_codes: int) -> float:
    """``1 - e^(-T/K)``: the usage even perfectly uniform code use reaches on ``T`` tokens (expected value)."""
    return 1.0 - math.exp(-num_tokens / num_codes)


def distortion_per_bit(mse: float, counts: torch.Tensor) -> float:
    """D / H2 (DiVeQ Eq. 17): mean squared quantisation error per bit of code entropy."""
    bits = entropy(counts, base=2.0)
    return float("inf") if bits == 0 else mse / bits
