"""``ns-vq``: Non-Stationary VQ (Beyond Stationarity, Sec. 3.3, Eqs. 16-18).

Non-selected codes follow encoder drift through a kernel-weighted embedding loss (Eq. 17), and
the selected code gets an extra ``a = 2/d`` share of the upstream gradient (modified STE, Eq. 18).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .base import Quantizer, straight_through
from .search import block_sizes


def ns_vq_tau(epoch: int, tau0: float = 1.0, decay: float = 0.9) -> float:
    """Kernel bandwidth ``tau = 2 sigma^2``: starts at ``tau0`` and is multiplied by ``decay`` per epoch."""
    return tau0 * decay ** epoch


def dense_embedding_loss(z: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor, tau: float, lam: float,
                         max_elements: int) -> torch.Tensor:
    """Eq. 17 as the authors compute it, in blocks of latents so memory stays O(block x K).

    ``w_ik = min(1, lam K sg(softmax_k(-||z_i - c_k||^2 / tau)))``, winner weight 1;
    ``L = (1/N) sum_i sum_k w_ik ||sg(z_i) - c_k||^2 / D``.
    """
    n, d = z.shape
    k = codebook.shape[0]
    z = z.detach()
    code_sq = codebook.pow(2).sum(1)
    rows, _ = block_sizes(n, k, max_elements)
    total = codebook.new_zeros(())
    for r0 in range(0, n, rows):
        zr, ir = z[r0 : r0 + rows], idx[r0 : r0 + rows]
        dist = (zr.pow(2).sum(1, keepdim=True) + code_sq - 2 * zr @ codebook.T).clamp_min(0)  # (rows, K), grad to C
        with torch.no_grad():
            w = (lam * k * torch.softmax(-dist / tau, dim=1)).clamp_max(1.0)
            w.scatter_(1, ir[:, None], 1.0)
        total = total + (w * dist).sum()
    return total / (n * d)


class NSVQ(Quantizer):
    """Learnable ``C``; dense kernel loss + commitment; modified STE ``z + sg(c - z) + a c - sg(a c)``."""

    def __init__(self, num_codes: int, dim: int, *, tau: float = 1.0, tau_decay: float = 0.9, lam: float = 0.01,
                 ste_scale: str = "paper", **options):
        super().__init__(num_codes, dim, **options)
        if ste_scale not in ("paper", "code"):
            raise ValueError(f"ste_scale must be 'paper' (a = 2/d) or 'code' (a = 2*alpha/(d*D)); got {ste_scale!r}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.tau, self.tau_decay, self.lam, self.ste_scale = float(tau), float(tau_decay), float(lam), ste_scale
        self.codebook = nn.Parameter(torch.empty(self.num_codes, self.dim).uniform_(-1 / self.num_codes, 1 / self.num_codes))

    def set_epoch(self, epoch: int, tau0: float = 1.0) -> None:
        """Apply the per-epoch bandwidth decay."""
        self.tau = ns_vq_tau(epoch, tau0, self.tau_decay)

    def effective_codebook(self) -> torch.Tensor:
        return self.codebook

    def ste_coefficient(self, num_latents: int) -> float:
        """``a`` of Eq. 18: ``2/d`` with ``d = B*H*W`` (paper) or ``2/(d*D)`` (authors' code, alpha = 1)."""
        return 2.0 / num_latents if self.ste_scale == "paper" else 2.0 / (num_latents * self.dim)

    def _train_step(self, z):
        idx = self.nearest(z, self.codebook)
        c = self.codebook[idx]
        a = self.ste_coefficient(z.shape[0])
        zq = straight_through(z, c) + (a * c - (a * c).detach())  # Eq. 18
        loss = dense_embedding_loss(z, self.codebook, idx, self.tau, self.lam, self.max_search_elements)
        loss = loss + self.beta * F.mse_loss(z, c.detach())
        return zq, idx, loss
