"""``diveq`` / ``diveq-detach``: differentiable VQ by directional reparameterisation (DiVeQ Eqs. 8, 16)."""
from __future__ import annotations

import torch
from torch import nn

from .base import Quantizer

EPS = 1e-12


def directional_error(z: torch.Tensor, c: torch.Tensor, v: torch.Tensor | None = None,
                      weight: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``||c - z|| sg(weight v_d / ||v_d||)`` with ``v_d = v + (c - z)`` (Eq. 8); ``v = None`` gives Eq. 16."""
    diff = c - z
    direction = diff.detach() if v is None else diff.detach() + v
    direction = weight * direction / direction.norm(dim=1, keepdim=True).clamp_min(EPS)
    return diff.norm(dim=1, keepdim=True) * direction.detach()


class DiVeQ(Quantizer):
    """``z_q = z + ||c - z|| sg(v_d/||v_d||)``, ``v ~ N(0, noise_std^2 I)`` (Eq. 8); no aux loss; ``C ~ U(0, 1/K)``.

    ``noise_std`` is a standard deviation: the paper's "sigma^2 = 1e-3" is the number its code passes to
    ``Normal(0, .)`` as the std (docs/fidelity.md).
    """

    default_replacement = "importance"
    detach = False

    def __init__(self, num_codes: int, dim: int, *, noise_std: float = 1e-3, **options):
        super().__init__(num_codes, dim, **options)
        if noise_std < 0:
            raise ValueError(f"noise_std must be non-negative, got {noise_std}")
        self.noise_std = float(noise_std)
        self.codebook = nn.Parameter(torch.empty(self.num_codes, self.dim).uniform_(0, 1 / self.num_codes))

    def effective_codebook(self) -> torch.Tensor:
        return self.codebook

    def _train_step(self, z):
        idx = self.nearest(z, self.codebook)
        c = self.codebook[idx]
        v = None if self.detach else self.noise_std * torch.randn_like(z)
        zq = z + directional_error(z, c, v)
        return zq, idx, z.new_zeros(())


class DiVeQDetach(DiVeQ):
    """Eq. 16: ``z_q = z + ||c - z|| sg((c - z)/||c - z||)``, the noiseless direction."""

    detach = True
