"""``rotation``: the rotation trick (Fifty et al. 2024): gradients pass through a rotation taking z to c."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import vq_loss
from .ema import ema_update, init_ema_state, write_ema_codes
from .vq import VQ

EPS = 1e-12


def rotate_to(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``sg(||c||/||z||) (z - 2 (z.w) w + 2 (z.sg(u)) sg(q))``, ``u = z/||z||``, ``q = c/||c||``, ``w = sg((u+q)/||u+q||)``.

    Forward value is ``c``; the Jacobian w.r.t. ``z`` is the scaled rotation taking ``u`` to ``q``.
    """
    z_norm = z.norm(dim=1, keepdim=True).clamp_min(EPS)
    c_norm = c.norm(dim=1, keepdim=True).clamp_min(EPS)
    u, q = (z / z_norm).detach(), (c / c_norm).detach()
    w = F.normalize(u + q, dim=1, eps=EPS).detach()
    rotated = z - 2 * (z * w).sum(1, keepdim=True) * w + 2 * (z * u).sum(1, keepdim=True) * q
    return (c_norm / z_norm).detach() * rotated


class RotationVQ(VQ):
    """Rotation-trick estimator; codebook learned by the ``vq`` loss, or by EMA with ``ema=True``."""

    def __init__(self, num_codes: int, dim: int, *, ema: bool = False, decay: float = 0.99, eps: float = 1e-5, **options):
        super().__init__(num_codes, dim, **options)
        self.ema = bool(ema)
        if self.ema:
            self.codebook.requires_grad_(False)
            init_ema_state(self, decay, eps)

    def _write_codes(self, index, values):
        if self.ema:
            write_ema_codes(self, index, values)
        else:
            super()._write_codes(index, values)

    def _train_step(self, z):
        idx = self.nearest(z, self.codebook)
        c = self.codebook[idx]
        if self.ema:
            loss = self.beta * F.mse_loss(z, c.detach())
            ema_update(self, z, idx)
        else:
            loss = vq_loss(z, c, self.beta)
        return rotate_to(z, c), idx, loss
