"""``gumbel``: straight-through Gumbel-softmax quantisation (Jang et al. 2016; taming's GumbelQuantize)."""
from __future__ import annotations

import torch
from torch import nn

from .base import Quantizer


def gumbel_temperature(epoch: int, num_epochs: int, floor: float = 0.1) -> float:
    """``t = max(0.1^(epoch/E), 0.1)``: anneals from 1 to the floor over ``E`` epochs."""
    return max(floor ** (epoch / max(num_epochs, 1)), floor)


class GumbelVQ(Quantizer):
    """A 1x1 conv (a linear map per latent) gives K logits; ``y = softmax((logits + g)/t)`` hard-forward,
    soft-backward; ``z_q = y C``; loss ``kl_weight * mean(sum_k q_k log(q_k K))``; eval takes the argmax."""

    supports_code_space = False  # tokens come from logits, not from distances
    nearest_lookup = False

    def __init__(self, num_codes: int, dim: int, *, temperature: float = 1.0, kl_weight: float = 5e-4, **options):
        super().__init__(num_codes, dim, **options)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature, self.kl_weight = float(temperature), float(kl_weight)
        self.to_logits = nn.Linear(self.dim, self.num_codes)
        self.codebook = nn.Parameter(torch.randn(self.num_codes, self.dim))

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        self.temperature = gumbel_temperature(epoch, num_epochs)

    def effective_codebook(self) -> torch.Tensor:
        return self.codebook

    def _eval_indices(self, z):
        return self.to_logits(z).argmax(dim=1)

    def _copy_codes(self, dst, src, noise):
        super()._copy_codes(dst, src, noise)
        self.to_logits.weight.data[dst] = self.to_logits.weight.data[src]
        self.to_logits.bias.data[dst] = self.to_logits.bias.data[src]

    def _train_step(self, z):
        logits = self.to_logits(z)
        g = -torch.empty_like(logits).exponential_().log()  # Gumbel(0, 1)
        soft = torch.softmax((logits + g) / self.temperature, dim=1)
        idx = soft.argmax(dim=1)
        hard = torch.zeros_like(soft).scatter_(1, idx[:, None], 1.0)
        y = hard - soft.detach() + soft
        q = torch.softmax(logits, dim=1)
        kl = (q * (q * self.num_codes + 1e-10).log()).sum(1).mean()  # KL(q || uniform)
        return y @ self.codebook, idx, self.kl_weight * kl
