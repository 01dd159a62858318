"""``sf-diveq`` / ``sf-diveq-detach``: space-filling DiVeQ (DiVeQ Eq. 12, Sec. B.2).

The codebook is read as the polyline ``c_1 .. c_K`` in index order. Training quantises to a random
point on the nearest dithered segment. At inference the token is the nearest codeword; the continuous
output is ``inference``: ``local`` (as released: ``z`` projected onto the better of the two segments at that
codeword), ``global`` (the nearest point of the whole polyline) or ``hard`` (the codeword, whose lookup the
priors decode; :meth:`VQTokenizer.set_hard_inference` forces it).
"""
from __future__ import annotations

import warnings
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


def project_local(z: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Nearest point to each ``z`` on the two segments ``[c_{i-1}, c_i]`` and ``[c_i, c_{i+1}]`` at its codeword
    ``i`` (one segment at either end of the polyline)."""
    last = codebook.shape[0] - 1
    best, best_dist = None, None
    for a, b in ((idx - 1, idx), (idx, idx + 1)):
        valid = (a >= 0) & (b <= last)
        a, b = a.clamp(0, last), b.clamp(0, last)
        start, seg = codebook[a], codebook[b] - codebook[a]
        seg_sq = seg.pow(2).sum(1, keepdim=True)
        t = torch.where(seg_sq > 0, ((z - start) * seg).sum(1, keepdim=True) / seg_sq.clamp_min(1e-30),
                        torch.zeros_like(seg_sq)).clamp(0, 1)
        point = start + t * seg
        dist = torch.where(valid, (z - point).pow(2).sum(1), torch.full_like(seg_sq[:, 0], float("inf")))
        if best is None:
            best, best_dist = point, dist
        else:
            better = (dist < best_dist)[:, None]
            best, best_dist = torch.where(better, point, best), torch.minimum(dist, best_dist)
    return best


INFERENCE = ("local", "global", "hard")
MIN_LATENTS_PER_CODE = 20  # DiVeQ Sec. A.5's ask for the data-driven initialisation


class SFDiVeQ(Quantizer):
    """Eq. 12 with one ``lambda ~ U(0,1)`` per segment per batch and two independent noise draws ``v1, v2 ~
    N(0, noise_std^2 I)`` (as released; ``shared_noise`` is the paper's one ``v``).

    The first ``warmup`` training steps pass latents through unquantised; at the end of the last one the
    codebook is set to the means of ``K`` consecutive chunks of the latents of the last ``init_batches`` batches.
    Those latents are checkpointed (:meth:`extra_state`), so a run killed during warm-up resumes exactly.
    """

    detach = False

    def __init__(self, num_codes: int, dim: int, *, noise_std: float = 1e-3, shared_noise: bool = False,
                 warmup: int = 1000, init_batches: int = 50, inference: str = "local", **options):
        if int(num_codes) < 2:
            raise ValueError(f"SF-DiVeQ needs at least 2 codes (one segment), got {num_codes}")
        super().__init__(num_codes, dim, **options)
        if noise_std < 0 or warmup < 0 or init_batches < 1:
            raise ValueError(f"need noise_std >= 0, warmup >= 0, init_batches >= 1; got {noise_std}, {warmup}, "
                             f"{init_batches}")
        if inference not in INFERENCE:
            raise ValueError(f"inference must be one of {', '.join(INFERENCE)}; got {inference!r}")
        self.noise_std, self.shared_noise, self.warmup = float(noise_std), bool(shared_noise), int(warmup)
        self.inference, self.hard_inference = inference, False  # hard_inference: the tokenizer's override
        self.codebook = nn.Parameter(torch.empty(self.num_codes, self.dim).uniform_(0, 1 / self.num_codes))
        self.register_buffer("data_initialized", torch.tensor(self.warmup == 0))
        self._initialized = self.warmup == 0  # the buffer's Python mirror: read each step without a host sync
        self._recent: deque[torch.Tensor] = deque(maxlen=int(init_batches))

    def effective_codebook(self) -> torch.Tensor:
        return self.codebook

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.data_initialized)

    def extra_state(self) -> dict:
        """Training state outside parameters and buffers: the warm-up latents kept for the initialisation."""
        return {"recent": [z.cpu() for z in self._recent]}

    def load_extra_state(self, state: dict) -> None:
        self._recent.clear()
        self._recent.extend(z.to(self.codebook.device) for z in state.get("recent", []))

    @torch.no_grad()
    def _init_from_latents(self) -> None:
        latents = torch.cat(list(self._recent))
        if latents.shape[0] < MIN_LATENTS_PER_CODE * self.num_codes:
            warnings.warn(f"SF-DiVeQ initialises {self.num_codes} codes from {latents.shape[0]} latents "
                          f"({latents.shape[0] / self.num_codes:.1f} per code, fewer than {MIN_LATENTS_PER_CODE}): "
                          "raise init_batches or the batch size", stacklevel=2)
        chunks = torch.tensor_split(latents, self.num_codes)
        means = torch.stack([ch.mean(0) if len(ch) else latents.mean(0) for ch in chunks])
        self._write_codes(torch.arange(self.num_codes, device=means.device), means)
        self.maintenance._broadcast_state(self)
        self._recent.clear()
        self.data_initialized.fill_(True)
        self._initialized = True

    def _nearest_endpoint(self, z, i):
        c1, c2 = self.codebook[i], self.codebook[i + 1]
        return torch.where((z - c2).pow(2).sum(1) < (z - c1).pow(2).sum(1), i + 1, i)

    def _train_step(self, z):
        step = self.maintenance.mirror["step"]
        if step < self.warmup:  # no quantisation during warm-up
            self._recent.append(z.detach().clone())
            idx = self.nearest(z, self.codebook)
            if step == self.warmup - 1:  # the end of the last warm-up step: the next step quantises
                self._init_from_latents()
            return z, idx, z.new_zeros(())
        if not self._initialized:  # a warm-up that ended before this quantizer was built
            self._init_from_latents()
        lam = torch.rand(self.num_codes - 1, 1, device=z.device, dtype=z.dtype)
        dithered = (1 - lam) * self.codebook[:-1] + lam * self.codebook[1:]
        i = self.nearest(z, dithered)
        c1, c2, li = self.codebook[i], self.codebook[i + 1], lam[i]
        v1 = v2 = None
        if not self.detach:
            v1 = self.noise_std * torch.randn_like(z)
            v2 = v1 if self.shared_noise else self.noise_std * torch.randn_like(z)
        zq = z + directional_error(z, c1, v1, 1 - li) + directional_error(z, c2, v2, li)  # Eq. 12
        return zq, self._nearest_endpoint(z.detach(), i), z.new_zeros(())

    def _eval_step(self, z):
        idx = self._eval_indices(z)
        mode = "hard" if self.hard_inference else self.inference
        if mode == "hard":
            return self.codebook[idx], idx
        codebook = self.codebook.detach()
        if mode == "local":
            return project_local(z, codebook, idx), idx
        return project_to_polyline(z, codebook, self.max_search_elements), idx


class SFDiVeQDetach(SFDiVeQ):
    """Eq. 16 form: ``v`` dropped, each term uses its own codeword's direction."""

    detach = True
