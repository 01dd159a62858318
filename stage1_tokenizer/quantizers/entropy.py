"""Entropy terms of the implicit-codebook quantizers (LFQ, BSQ, IBQ): per-sample entropy down, batch entropy up.

For binary codes the code distribution of a token factorises over bits: with ``a_ij`` the logit of bit ``j``
being 1, ``p_i(c) = prod_j sigmoid(a_ij)^[c_j] sigmoid(-a_ij)^[1-c_j] = softmax_c(a_i . bits(c))``. So the
per-sample entropy is a sum of binary entropies (exact, ``O(N d)``), and the batch distribution over all ``2^d``
codes is exactly ``P_lo^T P_hi / N``, the product of the two halves' per-token distributions (``N x 2^(d/2)``
each): one matrix product instead of an ``N x 2^d`` softmax, in memory ``O(N 2^(d/2) + 2^d)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def entropy(p: torch.Tensor, eps: float) -> torch.Tensor:
    """``-sum p log(p + eps)`` over the last axis (the released codes' eps form)."""
    return -(p * (p + eps).log()).sum(-1)


def binary_entropy(a: torch.Tensor) -> torch.Tensor:
    """Entropy of a bit with logit ``a`` (elementwise, exact and stable: ``log sigmoid`` rather than ``log p``)."""
    p = torch.sigmoid(a)
    return -(p * F.logsigmoid(a) + (1 - p) * F.logsigmoid(-a))


def bit_table(bits: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(2^bits, bits) 0/1 table, row ``i`` holding the bits of ``i`` little-endian (bit j = coordinate j)."""
    i = torch.arange(2 ** bits, device=device)
    return ((i[:, None] >> torch.arange(bits, device=device)) & 1).to(dtype)


def _code_probs(a: torch.Tensor) -> torch.Tensor:
    """(N, 2^g) per-token distribution over the codes of ``g`` bits with logits ``a`` (N, g)."""
    return torch.softmax(a @ bit_table(a.shape[1], a.device, a.dtype).T, dim=1)


def mean_code_distribution(a: torch.Tensor) -> torch.Tensor:
    """``mean_i p_i`` over all ``2^g`` codes of bit logits ``a`` (N, g), exactly, by splitting the bits in halves."""
    half = a.shape[1] // 2
    return (_code_probs(a[:, :half]).T @ _code_probs(a[:, half:])).flatten() / max(a.shape[0], 1)


def group_batch_entropy(a: torch.Tensor, group: int, eps: float) -> torch.Tensor:
    """``sum_g H(mean_i p_ig)``: the batch entropy of each group of ``group`` consecutive bits, summed; exact for
    one group of all bits, an upper bound on the joint batch entropy otherwise. ``a``: (N, d) bit logits."""
    n, d = a.shape
    if d % group:
        raise ValueError(f"the entropy group size {group} must divide the number of bits {d}")
    return sum(entropy(mean_code_distribution(a[:, s:s + group]), eps) for s in range(0, d, group))
