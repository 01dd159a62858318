"""``ema``: VQ-VAE with an exponential-moving-average codebook (van den Oord et al. 2017, App. A.1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Quantizer, straight_through
from .distributed import all_reduce_sum
from .stats import code_counts


@torch.no_grad()
def ema_update(q: Quantizer, z: torch.Tensor, idx: torch.Tensor) -> None:
    """One EMA step of ``q.codebook`` from ``q.cluster_size``/``q.embed_sum``, counts and sums all-reduced."""
    n = all_reduce_sum(code_counts(idx, q.num_codes, q.embed_sum.dtype))
    m = all_reduce_sum(torch.zeros_like(q.embed_sum).index_add_(0, idx, z.detach().to(q.embed_sum.dtype)))
    q.cluster_size.mul_(q.decay).add_(n, alpha=1 - q.decay)  # N_k <- g N_k + (1-g) n_k
    q.embed_sum.mul_(q.decay).add_(m, alpha=1 - q.decay)  # M_k <- g M_k + (1-g) m_k
    total = q.cluster_size.sum()
    smoothed = (q.cluster_size + q.eps) / (total + q.num_codes * q.eps) * total  # Laplace smoothing
    q.codebook.data.copy_(q.embed_sum / smoothed[:, None])  # c_k = M_k / N_k


def init_ema_state(q: Quantizer, decay: float, eps: float) -> None:
    """Give ``q`` the EMA statistics of its current ``codebook`` (which then learns by EMA, not by gradient)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must lie in [0, 1), got {decay}")
    q.decay, q.eps = float(decay), float(eps)
    q.register_buffer("cluster_size", torch.ones(q.num_codes))  # N_k
    q.register_buffer("embed_sum", q.codebook.detach().clone())  # M_k


def write_ema_codes(q: Quantizer, index: torch.Tensor, values: torch.Tensor) -> None:
    """Replace codes and restart their statistics as one assignment at the new value."""
    q.codebook.data[index] = values.to(q.codebook.dtype)
    q.cluster_size[index] = 1.0
    q.embed_sum[index] = q.codebook.data[index]


class EMA(Quantizer):
    """Codebook is a buffer updated by EMA of assignment counts ``N`` and sums ``M``; loss ``beta ||z - sg(c)||^2``."""

    def __init__(self, num_codes: int, dim: int, *, decay: float = 0.99, eps: float = 1e-5, **options):
        super().__init__(num_codes, dim, **options)
        self.register_buffer("codebook", torch.randn(self.num_codes, self.dim))
        init_ema_state(self, decay, eps)

    def effective_codebook(self) -> torch.Tensor:
        return self.codebook

    def _write_codes(self, index, values):
        write_ema_codes(self, index, values)

    def _train_step(self, z):
        idx = self.nearest(z, self.codebook)
        c = self.codebook[idx]
        loss = self.beta * F.mse_loss(z, c)
        ema_update(self, z, idx)
        return straight_through(z, c), idx, loss
