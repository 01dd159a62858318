"""``transvq``: TransVQ (Beyond Stationarity, Sec. 3.4): the codebook mapped through a light transformer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Quantizer, straight_through, vq_loss


NORM_EPS = 1e-6


class LinearAttention(nn.Module):
    """Single-head, non-causal linear attention over the K codes, ``phi(x) = elu(x) + 1``; the normaliser gets
    ``+ 1e-6`` as released."""

    def __init__(self, width: int):
        super().__init__()
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.elu(self.q(x)) + 1, F.elu(self.k(x)) + 1, self.v(x)
        kv = k.T @ v  # (width, width): sum_j phi(k_j) v_j^T
        norm = q @ k.sum(0, keepdim=True).T  # (K, 1): phi(q_i) . sum_j phi(k_j)
        return self.out((q @ kv) / (norm + NORM_EPS))


class CodebookTransformer(nn.Module):
    """``P``: Linear(Df->width) + position embedding, one pre-LN block (linear attention, GELU FFN), LN, Linear(width->D)."""

    def __init__(self, num_codes: int, base_dim: int, dim: int, width: int = 256, mlp_ratio: int = 2):
        super().__init__()
        self.inp = nn.Linear(base_dim, width, bias=False)
        self.pos = nn.Parameter(torch.randn(num_codes, width))  # N(0, 1), as the released nn.Embedding
        self.norm1 = nn.LayerNorm(width)
        self.attn = LinearAttention(width)
        self.norm2 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, width * mlp_ratio), nn.GELU(), nn.Linear(width * mlp_ratio, width))
        self.norm_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim, bias=False)

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        x = self.inp(base) + self.pos
        x = x + self.attn(self.norm1(x))
        x = x + self.ffn(self.norm2(x))
        return self.out(self.norm_out(x))


class TransVQ(Quantizer):
    """Frozen base ``C ~ N(0, 1/Df)``, effective codebook ``E = P(C)`` recomputed each training step, cached in eval."""

    supports_code_space = False  # P is not invertible, so latents have no base-space image

    def __init__(self, num_codes: int, dim: int, *, base_dim: int | None = None, width: int = 256,
                 mlp_ratio: int = 2, **options):
        self.base_dim = int(base_dim or dim)
        super().__init__(num_codes, dim, **options)
        self.register_buffer("codebook", torch.randn(self.num_codes, self.base_dim) * self.base_dim ** -0.5)
        self.transform = CodebookTransformer(self.num_codes, self.base_dim, self.dim, width, mlp_ratio)
        self._cache: torch.Tensor | None = None

    @property
    def code_dim(self) -> int:
        return self.base_dim

    def train(self, mode: bool = True):
        self._cache = None  # weights may change between eval phases
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._cache = None  # device or dtype change
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    def effective_codebook(self) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            return self.transform(self.codebook)
        if self._cache is None:
            self._cache = self.transform(self.codebook)
        return self._cache

    def _copy_codes(self, dst, src, noise):
        super()._copy_codes(dst, src, noise)
        self.transform.pos.data[dst] = self.transform.pos.data[src]  # same token -> same output code

    def _train_step(self, z):
        e = self.effective_codebook()
        idx = self.nearest(z, e)
        c = e[idx]
        return straight_through(z, c), idx, vq_loss(z, c, self.beta)
