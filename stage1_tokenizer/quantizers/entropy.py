"""Entropy terms of the implicit-codebook quantizers (LFQ, BSQ, IBQ): per-sample entropy down, batch entropy up.

For binary codes the code distribution of a token factorises over bits: with ``a_ij`` the logit of bit ``j``
being 1, ``p_i(c) = prod_j sigmoid(a_ij)^[c_j] sigmoid(-a_ij)^[1-c_j] = softmax_c(a_i . bits(c))``. So the
per-sample entropy is a sum of binary entropies (exact, ``O(N d)``), and the batch distribution of a group of
``g`` bits is a mean of ``2^g``-way softmaxes, computed in token chunks with activation checkpointing so that
at most ``chunk x 2^g`` probabilities are held at once, forward or backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

MAX_ELEMENTS = 1 << 22  # probabilities held at once by the batch-entropy softmax (16 MiB in fp32)


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


def _softmax_sum(logits_fn, x: torch.Tensor, *args) -> torch.Tensor:
    return torch.softmax(logits_fn(x, *args), dim=-1).sum(0)


def mean_softmax(logits_fn, x: torch.Tensor, *args, width: int, max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """``mean_i softmax(logits_fn(x_i, *args))`` over the rows of ``x``, for ``width`` classes, in chunks of at most
    ``max_elements`` probabilities (checkpointed under autograd, so the backward pass also holds one chunk)."""
    chunk, total = max(1, max_elements // width), 0
    for s in range(0, x.shape[0], chunk):
        part = x[s:s + chunk]
        if torch.is_grad_enabled() and (part.requires_grad or any(a.requires_grad for a in args)):
            total = total + checkpoint(_softmax_sum, logits_fn, part, *args, use_reentrant=False)
        else:
            total = total + _softmax_sum(logits_fn, part, *args)
    return total / max(x.shape[0], 1)


def _group_logits(a: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return a @ table.T


def group_batch_entropy(a: torch.Tensor, group: int, eps: float, max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """``sum_g H(mean_i p_ig)``: the batch entropy of each group of ``group`` consecutive bits, summed; exact for
    one group of all bits, an upper bound on the joint batch entropy otherwise. ``a``: (N, d) bit logits."""
    n, d = a.shape
    if d % group:
        raise ValueError(f"the entropy group size {group} must divide the number of bits {d}")
    table = bit_table(group, a.device, a.dtype)
    groups = a.view(n, d // group, group).transpose(0, 1)  # (G, N, g)
    return sum(entropy(mean_softmax(_group_logits, g, table, width=len(table), max_elements=max_elements), eps)
               for g in groups)
