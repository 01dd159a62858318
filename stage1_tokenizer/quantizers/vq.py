"""``vq``: VQ-VAE (van den Oord et al. 2017), codebook and commitment loss, straight-through."""
from __future__ import annotations

import torch
from torch import nn

from .base import Quantizer, straight_through, vq_loss


class VQ(Quantizer):
    """Learnable codebook ``C ~ U(-1/K, 1/K)``; loss ``||sg(z)-c||^2 + beta ||z-sg(c)||^2``; ``z_q = z + sg(c - z)``."""

    def __init__(self, num_codes: int, dim: int, **options):
        super().__init__(num_codes, dim, **options)
        self.codebook = nn.Parameter(torch.empty(self.num_codes, self.dim).uniform_(-1 / self.num_codes, 1 / self.num_codes))

    def effective_codebook(self) -> torch.Tensor:
        return self.codebook

    def _train_step(self, z):
        idx = self.nearest(z, self.codebook)
        c = self.codebook[idx]
        return straight_through(z, c), idx, vq_loss(z, c, self.beta)
