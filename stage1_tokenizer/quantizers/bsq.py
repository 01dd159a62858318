"""``bsq``: binary spherical quantization (Zhao et al. 2024, BSQ-ViT; as released)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .entropy import binary_entropy, bit_table, group_batch_entropy
from .implicit import ImplicitQuantizer, code_bits


def entropy_weight(step: int, base: float = 0.1, start_factor: float = 3.0, warmup: int = 2000) -> float:
    """BSQ-ViT's entropy weight ``base (r + start_factor (1 - r))``, ``r = min(step, warmup) / warmup``."""
    r = min(step, warmup) / warmup if warmup > 0 else 1.0
    return base * (r + start_factor * (1 - r))


class BSQ(ImplicitQuantizer):
    """Sign of the unit-normalised latent, scaled to the unit sphere, with a grouped entropy loss.

    ``u = x/||x||``, ``q = (u + sg(sign(u) - u))/sqrt(d)`` (value ``sign(u)/sqrt(d)``, 0 -> -1; gradient
    ``I/sqrt(d)``); token big-endian; loss ``beta ||sg(q) - u||^2 + zeta (gamma0 H_s - gamma H_b)/tau`` weighted
    by the warm-up schedule of :func:`entropy_weight`, entropies over groups of ``group_size`` bits."""

    def __init__(self, num_codes: int, dim: int, *, beta: float = 0.0, group_size: int = 1, tau: float = 1.0,
                 gamma0: float = 1.0, gamma: float = 1.0, zeta: float = 1.0, entropy_weight: float = 0.1,
                 entropy_start_factor: float = 3.0, entropy_warmup: int = 2000, scaled_ste: bool = True, **options):
        d = code_bits(num_codes, "bsq")
        if group_size < 1 or d % group_size:
            raise ValueError(f"group_size must divide the {d} bits; got {group_size}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.group_size, self.tau, self.gamma0, self.gamma, self.zeta = int(group_size), float(tau), gamma0, gamma, zeta
        self.entropy_weight, self.entropy_start_factor = float(entropy_weight), float(entropy_start_factor)
        self.entropy_warmup, self.scaled_ste = int(entropy_warmup), bool(scaled_ste)
        self.step = 0
        super().__init__(num_codes, dim, d, beta=beta, **options)

    def code_table(self) -> torch.Tensor:
        d = self.code_dim
        return (2 * bit_table(d).flip(1) - 1) / math.sqrt(d)  # big-endian: coordinate 0 is the top bit

    def tokens(self, x):
        d = self.code_dim
        return ((x > 0).long() << torch.arange(d - 1, -1, -1, device=x.device)).sum(-1)

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def entropies(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(H_s, H_b) of unit latents: bit ``j`` has logit ``4 tau u_j / sqrt(d)`` (``softmax(2 tau u.c)`` over
        ``c in {+-1}^g / sqrt(d)``); H_s analytically (it equals the grouped form: a product distribution)."""
        a = 4 * self.tau * u / math.sqrt(self.code_dim)
        return binary_entropy(a).sum(1).mean(), group_batch_entropy(a, self.group_size, eps=1e-8)

    def _train_step(self, z):
        d = self.code_dim
        u = F.normalize(self.project_in(z), dim=1)
        sign = torch.where(u > 0, 1.0, -1.0)
        if self.scaled_ste:
            q = (u + (sign - u).detach()) / math.sqrt(d)
        else:  # vector-quantize-pytorch's spherical LFQ: the same value, gradient unscaled
            q = u + (sign / math.sqrt(d) - u).detach()
        h_sample, h_batch = self.entropies(u)
        weight = entropy_weight(self.step, self.entropy_weight, self.entropy_start_factor, self.entropy_warmup)
        commit = (q.detach() - u).pow(2).sum(1).mean()
        loss = self.beta * commit + weight * self.zeta * (self.gamma0 * h_sample - self.gamma * h_batch) / self.tau
        self.last_stats = {"entropy_sample": h_sample.detach(), "entropy_batch": h_batch.detach()}
        return self.project_out(q), self.tokens(u), loss
