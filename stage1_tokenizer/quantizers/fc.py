"""``fc``: factorised, l2-normalised codes (VQGAN-FC / ViT-VQGAN, Yu et al. 2022)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Quantizer, straight_through, vq_loss


class FactorizedVQ(Quantizer):
    """Project ``D -> code_dim``, l2-normalise latent and codes, look up on the sphere, project back."""

    def __init__(self, num_codes: int, dim: int, *, code_dim: int = 32, **options):
        self._code_dim = int(code_dim)
        if self._code_dim < 1:
            raise ValueError(f"code_dim must be positive, got {code_dim}")
        super().__init__(num_codes, dim, **options)
        self.proj_in = nn.Linear(self.dim, self._code_dim)
        self.proj_out = nn.Linear(self._code_dim, self.dim)
        self.codebook = nn.Parameter(F.normalize(torch.randn(self.num_codes, self._code_dim), dim=1))

    @property
    def code_dim(self) -> int:
        return self._code_dim

    def normalized_codes(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=1)

    def effective_codebook(self) -> torch.Tensor:
        return self.proj_out(self.normalized_codes())

    def lookup_space(self):
        """Unit codes between the projections: the nearest unit code of ``proj_in(z)`` is the nearest on the
        sphere (``||e|| = 1`` makes argmin ||x - e|| = argmax x.e), so no normalisation step is needed."""
        return self.normalized_codes(), self.proj_in, self.proj_out

    def _to_code_space(self, z):
        return F.normalize(self.proj_in(z), dim=1)

    def _eval_indices(self, z):
        return self.nearest(self._to_code_space(z), self.normalized_codes())

    def _train_step(self, z):
        zn = self._to_code_space(z)
        codes = self.normalized_codes()
        idx = self.nearest(zn, codes)
        c = codes[idx]
        return self.proj_out(straight_through(zn, c)), idx, vq_loss(zn, c, self.beta)
