"""Shared base of the implicit-codebook quantizers (``fsq``, ``lfq``, ``bsq``): a fixed ``K x d`` table ``C``
that no gradient or maintenance touches, between ``Linear(D->d)`` and ``Linear(d->D)`` when ``D != d``."""
from __future__ import annotations

import abc

import torch
from torch import nn

from .base import MAINTENANCE_OPTIONS, Quantizer


def code_bits(num_codes: int, name: str) -> int:
    """``d = log2 K`` of a binary quantizer; K must be a power of two."""
    d = int(num_codes).bit_length() - 1
    if int(num_codes) < 2 or 2 ** d != int(num_codes):
        raise ValueError(f"{name} needs num_codes = 2^d (one bit per latent coordinate); got {num_codes}")
    return d


class ImplicitQuantizer(Quantizer):
    """Latent ``z`` (D) -> ``x = P_in(z)`` (d) -> the variant's code ``C[i*]`` -> ``P_out``; ``effective_codebook()
    = P_out(C)`` (an explicit K x D table, so lookup, export and the priors treat it like any codebook)."""

    supports_code_space = False  # a fixed table: nothing to initialise or replace
    maintained = False
    unused_options = ("max_search_elements",)  # tokens by the variant's own rule: no nearest-code search

    def __init__(self, num_codes: int, dim: int, code_dim: int, **options):
        if set(options) & set(MAINTENANCE_OPTIONS):
            raise ValueError(f"{type(self).__name__} has a fixed implicit codebook: codebook maintenance "
                             f"({', '.join(sorted(set(options) & set(MAINTENANCE_OPTIONS)))}) does not apply")
        self._code_dim = int(code_dim)
        super().__init__(num_codes, dim, **options)
        projected = self.dim != self._code_dim
        self.proj_in = nn.Linear(self.dim, self._code_dim) if projected else None
        self.proj_out = nn.Linear(self._code_dim, self.dim) if projected else None
        self.register_buffer("table", self.code_table(), persistent=False)

    @property
    def code_dim(self) -> int:
        return self._code_dim

    @abc.abstractmethod
    def code_table(self) -> torch.Tensor:
        """The variant's (K, d) table ``C``, row ``i`` = the code of token ``i``."""

    @abc.abstractmethod
    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The variant's token rule ``i*`` on projected latents (N, d)."""

    def project_in(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj_in(z) if self.proj_in is not None else z

    def project_out(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(x) if self.proj_out is not None else x

    def effective_codebook(self) -> torch.Tensor:
        return self.project_out(self.table)

    def lookup_space(self):
        return self.table, self.proj_in, self.proj_out

    def _raw_codebook(self) -> torch.Tensor:
        return self.table

    def _eval_indices(self, z):
        return self.tokens(self.project_in(z))

    def _eval_step(self, z):
        idx = self._eval_indices(z)
        return self.project_out(self.table[idx]), idx

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, dim={self.dim}, code_dim={self.code_dim}"
