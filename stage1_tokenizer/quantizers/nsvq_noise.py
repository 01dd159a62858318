"""``nsvq-noise``: noise substitution (Vali & Backstrom 2022): the quantisation error replaced by scaled noise."""
from __future__ import annotations

import torch
from torch import nn

from .base import Quantizer


class NoiseSubstitutionVQ(Quantizer):
    """Training ``z_q = z + (||z - c|| / ||r||) r``, ``r ~ N(0, I)``; no stop-gradient, no aux loss; eval ``c``."""

    default_replacement = "random-used"

    def __init__(self, num_codes: int, dim: int, **options):
        super().__init__(num_codes, dim, **options)
        self.codebook = nn.Parameter(torch.randn(self.num_codes, self.dim))

    def effective_codebook(self) -> torch.Tensor:
        return self.codebook

    def _train_step(self, z):
        idx = self.nearest(z, self.codebook)
        c = self.codebook[idx]
        r = torch.randn_like(z)
        zq = z + ((z - c).norm(dim=1, keepdim=True) / r.norm(dim=1, keepdim=True)) * r
        return zq, idx, z.new_zeros(())
