"""``ns-vq``: Non-Stationary VQ (Beyond Stationarity, Sec. 3.3, Eqs. 16-18).

Non-selected codes follow encoder drift through a kernel-weighted embedding loss (Eq. 17), and
the selected code gets an extra ``a`` share of the upstream gradient (modified STE, Eq. 18): ``a = 2/(d D)``
as the authors' code computes it (docs/fidelity.md; the paper's ``2/d`` is ``ste_scale='paper'``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Quantizer, straight_through
from .search import block_sizes

TAU_FLOOR = 1e-8
CPU_BLOCK_ELEMENTS = 1 << 20  # kernel weights held at once on CPU (4 MiB in fp32): a block's passes stay in cache


def ns_vq_tau(epoch: float, tau0: float = 1.0, decay: float = 0.5) -> float:
    """Kernel bandwidth ``tau = 2 sigma^2``: ``tau0`` times ``decay`` per epoch (0.5 as released), floored at 1e-8."""
    return max(tau0 * decay ** epoch, TAU_FLOOR)


class _DenseEmbeddingLoss(torch.autograd.Function):
    """Eq. 17 in blocks of latents with an analytic backward, so no per-block graph is kept.

    Memory is O(block x K + K x D). Per block, one matmul of augmented matrices gives the logits
    ``(2 z_i.c_k - ||c_k||^2) / tau`` (``-||z_i - c_k||^2 / tau`` up to a per-row constant); torch's fused softmax
    takes each row's own maximum off, so it is finite for every ``tau > 0``. One more matmul gives every sum the
    loss and its gradient need: ``W_k = sum_i w_ik``, ``S_k = sum_i w_ik z_i``, ``Q_k = sum_i w_ik ||z_i||^2``.
    Then ``L = (sum_k Q_k - 2 c_k.S_k + ||c_k||^2 W_k) / (N D)`` and ``dL/dc_k = 2 (c_k W_k - S_k) / (N D)``.
    The second output is the regime diagnostic: the mean over latents of the non-winner weight sum, read off ``W``.
    """

    @staticmethod
    def forward(ctx, codebook, z, idx, tau, lam, max_elements):
        n, d = z.shape
        k = codebook.shape[0]
        code_sq = codebook.pow(2).sum(1)
        z_sq = z.pow(2).sum(1, keepdim=True)
        right = torch.cat([codebook * (2 / tau), -code_sq[:, None] / tau], dim=1)
        left_all = torch.cat([z, z.new_ones(n, 1)], dim=1)
        stats_all = torch.cat([left_all, z_sq], dim=1)
        acc = codebook.new_zeros(d + 2, k)  # [S | W | Q] transposed: the accumulation reads w row by row
        cpu = codebook.device.type == "cpu"
        rows, _ = block_sizes(n, k, min(max_elements, CPU_BLOCK_ELEMENTS) if cpu else max_elements)
        for r0 in range(0, n, rows):
            # softmax of -||z - c||^2 / tau (+ a per-row constant): one fused max / exp / sum pass
            w = torch.softmax(left_all[r0 : r0 + rows] @ right.T, dim=1)
            w.mul_(lam * k).clamp_max_(1.0)  # min(1, lam K softmax)
            w.scatter_(1, idx[r0 : r0 + rows, None], 1.0)  # the winner's weight is 1
            acc.addmm_(stats_all[r0 : r0 + rows].T, w)
        weighted_z, weight_sum, weighted_z_sq = acc[:d].T, acc[d], acc[d + 1]
        total = (weighted_z_sq.double().sum() - 2 * (codebook * weighted_z).double().sum()
                 + (code_sq * weight_sum).double().sum())
        ctx.save_for_backward(codebook, weight_sum, weighted_z)
        ctx.scale = 1.0 / (n * d)
        mass = (weight_sum.double().sum() / n - 1).to(codebook.dtype)  # each latent's weights sum, less its winner's
        ctx.mark_non_differentiable(mass)
        return (total * ctx.scale).to(codebook.dtype), mass

    @staticmethod
    def backward(ctx, grad, _grad_mass):
        codebook, weight_sum, weighted_z = ctx.saved_tensors
        grad_c = grad * 2 * ctx.scale * (codebook * weight_sum[:, None] - weighted_z)
        return grad_c, None, None, None, None, None


def dense_embedding_loss(z: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor, tau: float, lam: float,
                         max_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 17 as the authors compute it, in blocks of latents so memory stays O(block x K).

    ``w_ik = min(1, lam K sg(softmax_k(-||z_i - c_k||^2 / tau)))``, winner weight 1;
    ``L = (1/N) sum_i sum_k w_ik ||sg(z_i) - c_k||^2 / D``. ``idx`` comes from the shared search. Gradient
    reaches ``C`` only. Returns ``(L, mean_i sum_{k != i*} w_ik)``.
    """
    z = z.detach().to(codebook.dtype)
    return _DenseEmbeddingLoss.apply(codebook, z, idx, float(tau), float(lam), max_elements)


def spread_ratio(codebook: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """RMS distance of the codes to their mean over that of the latents to theirs: near 0, the codes have
    collapsed onto the latents' mean (the near-uniform kernel regime)."""
    codes = codebook.detach().float()
    z = z.detach().float()
    code_spread = (codes - codes.mean(0)).pow(2).sum(1).mean().sqrt()
    return code_spread / (z - z.mean(0)).pow(2).sum(1).mean().sqrt().clamp_min(1e-12)


class NSVQ(Quantizer):
    """Learnable ``C``; dense kernel loss + commitment; modified STE ``z + sg(c - z) + a c - sg(a c)``.

    Defaults as released (docs/fidelity.md): ``tau`` halves per epoch (``tau_decay``), ``a = 2/(d D)``
    (``ste_scale='code'``; ``'paper'`` gives ``2/d``).
    """

    def __init__(self, num_codes: int, dim: int, *, tau: float = 1.0, tau_decay: float = 0.5, lam: float = 0.01,
                 ste_scale: str = "code", **options):
        super().__init__(num_codes, dim, **options)
        if ste_scale not in ("paper", "code"):
            raise ValueError(f"ste_scale must be 'paper' (a = 2/d) or 'code' (a = 2*alpha/(d*D)); got {ste_scale!r}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        if not 0 < tau_decay <= 1:
            raise ValueError(f"tau_decay must lie in (0, 1], got {tau_decay}")
        self.tau, self.tau_decay, self.lam, self.ste_scale = float(tau), float(tau_decay), float(lam), ste_scale
        self.codebook = nn.Parameter(torch.empty(self.num_codes, self.dim).uniform_(-1 / self.num_codes, 1 / self.num_codes))

    def set_epoch(self, epoch: float, tau0: float = 1.0) -> None:
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
        loss, mass = dense_embedding_loss(z, self.codebook, idx, self.tau, self.lam, self.max_search_elements)
        # the kernel regime: mean non-winner weight sum and code / latent spread ratio (tensors: no sync)
        self.last_stats = {"nonwinner_weight": mass, "spread_ratio": spread_ratio(self.codebook, z)}
        loss = loss + self.beta * F.mse_loss(z, c.detach())
        return zq, idx, loss
