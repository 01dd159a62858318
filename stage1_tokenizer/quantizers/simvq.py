"""``simvq``: SimVQ (Zhu et al. 2024), a frozen random codebook times one learned linear map."""
from __future__ import annotations

import torch
from torch import nn

from .base import Quantizer, straight_through, vq_loss


class SimVQ(Quantizer):
    """Effective codebook ``E = C W`` + bias (as released: ``nn.Linear(D, D)``; ``bias=False`` is the option),
    ``C ~ N(0, 1/D)`` frozen, ``W`` learned."""

    def __init__(self, num_codes: int, dim: int, *, bias: bool = True, **options):
        super().__init__(num_codes, dim, **options)
        self.register_buffer("codebook", torch.randn(self.num_codes, self.dim) * self.dim ** -0.5)
        self.proj = nn.Linear(self.dim, self.dim, bias=bias)

    def effective_codebook(self) -> torch.Tensor:
        return self.proj(self.codebook)  # unlike the official get_codebook_entry, lookup includes W

    def _to_code_space(self, z):
        """Least-squares base codes whose image under the map is ``z``."""
        w = self.proj.weight.detach()
        target = z - self.proj.bias.detach() if self.proj.bias is not None else z
        return target @ torch.linalg.pinv(w).T

    def _train_step(self, z):
        e = self.effective_codebook()
        idx = self.nearest(z, e)
        c = e[idx]
        return straight_through(z, c), idx, vq_loss(z, c, self.beta)
