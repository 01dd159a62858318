"""``transvq``: TransVQ (Beyond Stationarity, Sec. 3.4): the codebook mapped through a light transformer."""
from __future__ import annotations

import torch
from torch import nn

from .base import Quantizer, straight_through, vq_loss

NORM_EPS = 1e-6
CPU_BLOCK_ROWS = 2048  # codes per block on CPU: the row-wise passes stay in cache


def phi(x: torch.Tensor) -> torch.Tensor:
    """``elu(x) + 1`` (equal to float rounding) as ``max(x, 0) + exp(min(x, 0))``: torch's CPU elu is much slower."""
    return x.clamp_min(0) + x.clamp_max(0).exp()


def blocks(x: torch.Tensor) -> list[torch.Tensor]:
    """``x`` split into row blocks: cache-sized on CPU, whole elsewhere."""
    return list(x.split(CPU_BLOCK_ROWS)) if x.device.type == "cpu" else [x]


class LinearAttention(nn.Module):
    """Single-head, non-causal linear attention over the K codes, ``phi(x) = elu(x) + 1``; the normaliser gets
    ``+ 1e-6`` as released."""

    def __init__(self, width: int):
        super().__init__()
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def summary(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What every output row reads from all K codes: ``sum_j phi(k_j) v_j^T`` with the output map folded in
        (width, width), and ``sum_j phi(k_j)`` (width, 1); built once per step, in row blocks."""
        kv = ksum = 0
        for part in blocks(x):
            k, v = phi(self.k(part)), self.v(part)
            kv, ksum = kv + k.T @ v, ksum + k.sum(0, keepdim=True).T
        return kv @ self.out.weight.T, ksum

    def read(self, x: torch.Tensor, summary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Output rows for queries ``x`` (any subset of the codes) given the codes' :meth:`summary`."""
        kv_out, ksum = summary
        q = phi(self.q(x))
        return (q @ kv_out) / (q @ ksum + NORM_EPS)  # out(phi(q_i) kv / (phi(q_i) . sum_j phi(k_j) + eps))


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

    def context(self, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The input rows ``x``, their normed form and the attention summary over all K codes."""
        x = self.inp(base) + self.pos
        h = self.norm1(x)
        return x, h, self.attn.summary(h)

    def rows(self, x: torch.Tensor, h: torch.Tensor, summary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Output codes of the rows ``x`` (normed ``h``): everything after the summary is row by row, so in blocks."""
        out = [self._rows(xs, hs, summary) for xs, hs in zip(blocks(x), blocks(h))]
        return out[0] if len(out) == 1 else torch.cat(out)

    def _rows(self, x: torch.Tensor, h: torch.Tensor, summary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attn.read(h, summary)
        x = x + self.ffn(self.norm2(x))
        return self.out(self.norm_out(x))

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return self.rows(*self.context(base))


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
        # Only the N selected codes receive gradient, and P is row by row once the attention summary over all K
        # codes is known; so with N well below K the full map runs without autograd (for the search) and only the
        # selected rows are recomputed with it (same gradients; at K = 65,536, N = 16,384 about half the time).
        # Recomputing N rows costs about N/K of a full pass per direction, so at N >= 2K/3 the full map is cheaper.
        if 3 * len(z) >= 2 * self.num_codes:
            e = self.transform(self.codebook)
            idx = self.nearest(z, e)
            c = e[idx]
        else:
            x, h, summary = self.transform.context(self.codebook)
            with torch.no_grad():
                e = self.transform.rows(x, h, summary)
            idx = self.nearest(z, e)
            if idx.device.type == "cpu":  # each selected code once (unique's size would sync a GPU with the host)
                used, inverse = torch.unique(idx, return_inverse=True)
                c = self.transform.rows(x[used], h[used], summary)[inverse]
            else:
                c = self.transform.rows(x[idx], h[idx], summary)
        return straight_through(z, c), idx, vq_loss(z, c, self.beta)
