"""``sf-diveq`` / ``sf-diveq-detach``: space-filling DiVeQ (DiVeQ Eq. 12, Sec. B.2).

The codebook is read as the polyline ``c_1 .. c_K`` in index order. Training quantises to a random
point on the nearest dithered segment; inference projects onto the nearest segment (continuous),
and the token is the nearest codeword, whose lookup is the hard (``hard_inference``) output.
"""
from __future__ import annotations

from collections import deque

import torch
from torch import nn

from .base import Quantizer
from .diveq import directional_error
from .search import block_sizes


@torch.no_grad()
def project_to_polyline(z: torch.Tensor, codebook: torch.Tensor, max_elements: int) -> torch.Tensor:
    """Nearest point to each row of ``z`` on the polyline through the rows of ``codebook``, in blocks of rows."""
    start, seg = codebook[:-1], codebook[1:] - codebook[:-1]
    seg_sq = seg.pow(2).sum(1)
    start_dot = (start * seg).sum(1)
    start_sq = start.pow(2).sum(1)
    rows, _ = block_sizes(z.shape[0], 4 * seg.shape[0], max_elements)
    out = torch.empty_like(z)
    for r0 in range(0, z.shape[0], rows):
        zr = z[r0 : r0 + rows]
        along = zr @ seg.T - start_dot  # (z - c_j) . s_j
        t = torch.where(seg_sq > 0, along / seg_sq.clamp_min(1e-30), torch.zeros_like(along)).clamp(0, 1)
        to_start = zr.pow(2).sum(1, keepdim=True) - 2 * zr @ start.T + start_sq  # ||z - c_j||^2
        dist = to_start - 2 * t * along + t.pow(2) * seg_sq  # ||z - c_j - t s_j||^2
        j = dist.argmin(dim=1)
        out[r0 : r0 + rows] = start[j] + t.gather(1, j[:, None]) * seg[j]
    return out


class SFDiVeQ(Quantizer):
    """Eq. 12 with one ``lambda ~ U(0,1)`` per segment per batch and one shared ``v ~ N(0, sigma2 I)``.

    The first ``warmup`` training steps pass latents through unquantised; then the codebook is
    set to the means of ``K`` consecutive chunks of the latents of the last ``init_batches`` batches.
    """

    detach = False

    def __init__(self, num_codes: int, dim: int, *, sigma2: float = 1e-3, warmup: int = 1000, init_batches: int = 10,
                 hard_inference: bool = False, **options):
        if int(num_codes) < 2:
            raise ValueError(f"SF-DiVeQ needs at least 2 codes (one segment), got {num_codes}")
        super().__init__(num_codes, dim, **options)
        if sigma2 < 0 or warmup < 0 or init_batches < 1:
            raise ValueError(f"need sigma2 >= 0, warmup >= 0, init_batches >= 1; got {sigma2}, {warmup}, {init_batches}")
        self.sigma2, self.warmup, self.hard_inference = float(sigma2), int(warmup), bool(hard_inference)
        self.codebook = nn.Parameter(torch.empty(self.num_codes, self.dim).uniform_(0, 1 / self.num_codes))
        self.register_buffer("data_initialized", torch.tensor(self.warmup == 0))
        self._recent: deque[torch.Tensor] = deque(maxlen=int(init_batches))

    def effective_codebook(self) -> torch.Tensor:
        return self.codebook

    @torch.no_grad()
    def _init_from_latents(self) -> None:
        latents = torch.cat(list(self._recent))
        chunks = torch.tensor_split(latents, self.num_codes)
        means = torch.stack([ch.mean(0) if len(ch) else latents.mean(0) for ch in chunks])
        self._write_codes(torch.arange(self.num_codes, device=means.device), means)
        self.maintenance._broadcast_state(self)
        self._recent.clear()
        self.data_initialized.fill_(True)

    def _nearest_endpoint(self, z, i):
        c1, c2 = self.codebook[i], self.codebook[i + 1]
        return torch.where((z - c2).pow(2).sum(1) < (z - c1).pow(2).sum(1), i + 1, i)

    def _train_step(self, z):
        if int(self.maintenance.step) < self.warmup:  # no quantisation during warm-up
            self._recent.append(z.detach().clone())
            return z, self.nearest(z, self.codebook), z.new_zeros(())
        if not bool(self.data_initialized):
            self._init_from_latents()
        lam = torch.rand(self.num_codes - 1, 1, device=z.device, dtype=z.dtype)
        dithered = (1 - lam) * self.codebook[:-1] + lam * self.codebook[1:]
        i = self.nearest(z, dithered)
        c1, c2, li = self.codebook[i], self.codebook[i + 1], lam[i]
        v = None if self.detach else self.sigma2 ** 0.5 * torch.randn_like(z)
        zq = z + directional_error(z, c1, v, 1 - li) + directional_error(z, c2, v, li)  # Eq. 12
        return zq, self._nearest_endpoint(z.detach(), i), z.new_zeros(())

    def _eval_step(self, z):
        idx = self._eval_indices(z)
        if self.hard_inference:
            return self.codebook[idx], idx
        return project_to_polyline(z, self.codebook.detach(), self.max_search_elements), idx


class SFDiVeQDetach(SFDiVeQ):
    """Eq. 16 form: ``v`` dropped, each term uses its own codeword's direction."""

    detach = True
