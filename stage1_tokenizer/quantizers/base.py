"""The interface every quantizer implements: (B, D, H, W) latents in, :class:`QuantizerOutput` out.

A subclass supplies the training rule (``_train_step``) and its ``effective_codebook``; the base
class does the reshaping, the eval-mode lookup, the statistics and codebook maintenance.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .maintenance import CodebookMaintenance
from .search import DEFAULT_MAX_ELEMENTS, nearest_code
from .stats import code_counts, step_stats


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, D, H, W)
    indices: torch.Tensor  # (B, H, W) long; (B, L, H, W) for rvq
    loss: torch.Tensor  # scalar
    stats: dict = field(default_factory=dict)


def straight_through(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Forward value c, gradient to z unchanged: ``z + sg(c - z)``."""
    return z + (c - z).detach()


def vq_loss(z: torch.Tensor, c: torch.Tensor, beta: float) -> torch.Tensor:
    """Codebook + commitment loss ``||sg(z) - c||^2 + beta ||z - sg(c)||^2`` (means over elements)."""
    return F.mse_loss(c, z.detach()) + beta * F.mse_loss(z, c.detach())


MAINTENANCE_OPTIONS = ("replacement", "replace_every", "replace_until", "dead_threshold", "replace_noise",
                       "reservoir_size", "kmeans_init", "kmeans_iters", "no_replace_last")


class Quantizer(nn.Module, abc.ABC):
    """Base of every variant. Options shared by all are the keyword arguments below."""

    default_replacement = "none"
    supports_code_space = True  # whether latents map into the raw codebook's space (reservoir, k-means)
    nearest_lookup = True  # whether inference tokens are nearest codes of lookup_space (Gumbel: logits' argmax)
    linear_lookup = True  # whether lookup_space's in_map alone takes latents there (FSQ: a nonlinear bound follows)
    maintained = True  # whether codebook maintenance (replacement, k-means init) applies: not to fixed tables
    unused_options: tuple[str, ...] = ()  # shared options this variant's rule never reads: refused, not ignored
    check_finite = True  # raise at once on non-finite latents (a host sync); a trainer that checks its loss turns it off

    def __init__(self, num_codes: int, dim: int, *, beta: float = 0.25, replacement: str | None = None,
                 replace_every: int | None = None, replace_until: int | None = None, dead_threshold: float = 0.01,
                 replace_noise: float = 1e-3, reservoir_size: int = 16384, kmeans_init: bool = False,
                 kmeans_iters: int = 10, no_replace_last: int | None = None,
                 max_search_elements: int = DEFAULT_MAX_ELEMENTS):
        super().__init__()
        if int(num_codes) < 1 or int(dim) < 1:
            raise ValueError(f"num_codes and dim must be positive, got num_codes={num_codes}, dim={dim}")
        self.num_codes, self.dim, self.beta = int(num_codes), int(dim), float(beta)
        self.max_search_elements = max_search_elements
        replacement = self.default_replacement if replacement is None else replacement
        if not self.supports_code_space and (replacement == "reservoir" or kmeans_init):
            raise ValueError(f"{type(self).__name__} cannot map latents into its codebook space, so "
                             "reservoir replacement and kmeans_init are unavailable; use importance or random-used")
        self.maintenance = CodebookMaintenance(self.num_codes, self.code_dim, replacement, replace_every,
                                               replace_until, dead_threshold, replace_noise, reservoir_size,
                                               kmeans_init, kmeans_iters, no_replace_last)
        self.last_stats: dict = {}  # a variant's diagnostics of its last training step (entropies, ...)

    # --- what a variant defines -------------------------------------------------------------
    @property
    def code_dim(self) -> int:
        """Dimension of the raw codebook rows (``dim`` unless the variant projects)."""
        return self.dim

    @abc.abstractmethod
    def effective_codebook(self) -> torch.Tensor:
        """The (K, D) matrix that inference looks codes up in."""

    def lookup_space(self) -> tuple[torch.Tensor, nn.Module | None, nn.Module | None]:
        """(codebook, in_map, out_map) of the plain lookup inference equals: a token is the nearest ``codebook``
        row to ``in_map(z)`` and decodes from ``out_map(row)``. Export folds the maps into a VQModel's
        quant_conv / post_quant_conv, and the latent diffusion prior models latents in this space."""
        return self.effective_codebook(), None, None

    @abc.abstractmethod
    def _train_step(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training rule on flat latents (N, D): (z_q (N, D), indices (N,), loss)."""

    def _eval_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Inference token of each flat latent: its nearest effective code."""
        return self.nearest(z, self.effective_codebook())

    def _eval_step(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._eval_indices(z)
        return self.effective_codebook()[idx], idx

    def _to_code_space(self, z: torch.Tensor) -> torch.Tensor:
        """Latents expressed in the raw codebook's space (for k-means init and reservoir)."""
        return z

    def _raw_codebook(self) -> torch.Tensor:
        return self.codebook

    def _write_codes(self, index: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite raw codebook rows ``index`` with ``values`` (outside autograd)."""
        self._raw_codebook().data[index] = values.to(self._raw_codebook().dtype)

    def _copy_codes(self, dst: torch.Tensor, src: torch.Tensor, noise: float) -> None:
        """Make codes ``dst`` copies of codes ``src`` plus Gaussian noise of std ``noise`` x code RMS."""
        raw = self._raw_codebook().data
        scale = raw.pow(2).mean().sqrt().clamp_min(1e-12)
        self._write_codes(dst, raw[src] + noise * scale * torch.randn_like(raw[src]))

    def extra_state(self) -> dict:
        """Training state held outside parameters and buffers, which checkpoints must carry (none by default)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore :meth:`extra_state` from a checkpoint."""

    def set_step(self, step: int) -> None:
        """The optimizer step the trainer is at, for a loss weight that follows it (BSQ); ignored by default."""

    def step_stats(self) -> dict:
        """Variant-specific diagnostics of the last training step, merged into ``stats``: what the step left in
        ``last_stats`` (none by default)."""
        return dict(self.last_stats)

    # --- shared machinery --------------------------------------------------------------------
    def nearest(self, z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        return nearest_code(z, codebook, self.max_search_elements)[0]

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, dim={self.dim}, replacement={self.maintenance.policy!r}"

    def _check_input(self, z: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[1] != self.dim:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"{type(self).__name__} expects latents of shape (B, {self.dim}, H, W); got {shape}")
        if self.check_finite and not torch.isfinite(z).all():  # before any codebook state (EMA sums, counters) could absorb it
            raise FloatingPointError(f"{type(self).__name__} got non-finite latents (NaN or inf); codebook left unchanged")

    @torch.compiler.disable  # Python-steered state (mirrors, schedules) and data-dependent shapes: stays eager
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self._check_input(z)
        with torch.autocast(z.device.type, enabled=False):  # quantisation runs in fp32 under mixed precision
            return self._forward(z.float())

    def _forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        if self.training:
            code_space = self._to_code_space(flat.detach()) if self.maintenance.needs_latents() else None
            self.maintenance.before_step(self, code_space)
            zq, idx, loss = self._train_step(flat)
            self.maintenance.after_step(idx, code_space)
        else:
            zq, idx = self._eval_step(flat)
            loss = flat.new_zeros(())
        counts = code_counts(idx, self.num_codes)
        stats = {**step_stats(counts), **self.maintenance.stats(),
                 **(self.step_stats() if self.training else {})}
        quantized = zq.view(b, h, w, d).permute(0, 3, 1, 2)
        return QuantizerOutput(quantized, idx.view(b, h, w), loss, stats)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Latents (B, D, H, W) of token indices (B, H, W)."""
        if indices.dtype != torch.long or indices.dim() != 3:
            raise ValueError(f"lookup expects long indices of shape (B, H, W); got {indices.dtype} {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_codes):
            raise ValueError(f"indices must lie in [0, {self.num_codes}); got range [{int(indices.min())}, {int(indices.max())}]")
        return self.effective_codebook()[indices].permute(0, 3, 1, 2)
