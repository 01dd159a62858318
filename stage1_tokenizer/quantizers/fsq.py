"""``fsq``: finite scalar quantization (Mentzer et al. 2023), with the iFSQ bound as an option."""
from __future__ import annotations

import math

import torch

from .implicit import ImplicitQuantizer

# FSQ paper Table 1: target codebook size -> levels; a row is found by its power of two or its own size
PAPER_LEVELS = {2 ** 8: [8, 6, 5], 2 ** 10: [8, 5, 5, 5], 2 ** 12: [7, 5, 5, 5, 5], 2 ** 14: [8, 8, 8, 6, 5],
                2 ** 16: [8, 8, 8, 5, 5, 5]}


def levels_for(num_codes: int) -> list[int]:
    """The paper's levels for ``num_codes`` (2^8 ... 2^16, or the product of a row's levels)."""
    for power, levels in PAPER_LEVELS.items():
        if int(num_codes) in (power, math.prod(levels)):
            return list(levels)
    sizes = ", ".join(f"{p} ({math.prod(lv)} codes: {lv})" for p, lv in PAPER_LEVELS.items())
    raise ValueError(f"fsq has no paper levels for num_codes={num_codes}; use one of {sizes}, or give levels=[...]")


def resolve_levels(num_codes: int, levels: list[int] | None) -> list[int]:
    """Levels of an fsq run: explicit ``levels`` (whose product must be ``num_codes``) or the paper's row."""
    if levels is None:
        return levels_for(num_codes)
    levels = [int(v) for v in levels]
    size = math.prod(levels)
    if size != int(num_codes) and PAPER_LEVELS.get(int(num_codes)) != levels:
        raise ValueError(f"fsq levels {levels} give {size} codes but num_codes is {num_codes}; set num_codes={size}")
    return levels


def _shift_and_half(level: int, kind: str, eps: float) -> tuple[float, float, float]:
    """(input shift, half-width h, output offset o) of the tanh bounds for one coordinate with ``level`` values."""
    offset = 0.5 if level % 2 == 0 else 0.0
    if kind == "tanh":  # the FSQ authors' notebook (paper App. A.1)
        half = (level - 1) * (1 - eps) / 2
        return math.tan(offset / half), half, offset
    half = (level - 1) * (1 + eps) / 2  # vector-quantize-pytorch
    return math.atanh(offset / half), half, offset


def fsq_bound(x: torch.Tensor, levels: list[int], kind: str = "tanh", eps: float = 1e-3) -> torch.Tensor:
    """Bound ``x`` (..., d) so that rounding gives ``L_j`` values per coordinate: ``tanh``: ``tanh(x + tan(o/h)) h
    - o``, ``h = (L-1)(1-eps)/2``, ``o = 1/2`` for even L; ``atanh``: ``h = (L-1)(1+eps)/2``, shift ``atanh(o/h)``;
    ``ifsq``: ``(2 sigmoid(1.6 x) - 1)(L-1)/2`` (odd L)."""
    if kind == "ifsq":
        return (2 * torch.sigmoid(1.6 * x) - 1) * x.new_tensor([(v - 1) / 2 for v in levels])
    shift, half, offset = (x.new_tensor(c) for c in zip(*(_shift_and_half(v, kind, eps) for v in levels)))
    return torch.tanh(x + shift) * half - offset


def cell_edges(levels: list[int], kind: str = "tanh", eps: float = 1e-3) -> torch.Tensor:
    """(d, max L - 1) inputs ``x`` where the bound crosses ``r + 1/2`` (rounding changes digit), +inf padded:
    the bound is increasing, so a coordinate's digit is the number of its edges below it."""
    edges = torch.full((len(levels), max(levels) - 1), math.inf, dtype=torch.float64)
    for j, level in enumerate(levels):
        b = torch.arange(level - 1, dtype=torch.float64) - level // 2 + 0.5  # between digits r and r + 1
        if kind == "ifsq":
            edges[j, :level - 1] = torch.atanh(2 * b / (level - 1)) / 0.8  # (2 sigmoid(1.6x) - 1) = tanh(0.8x)
        else:
            shift, half, offset = _shift_and_half(level, kind, eps)
            edges[j, :level - 1] = torch.atanh((b + offset) / half) - shift
    return edges.float()


def radix_basis(levels: torch.Tensor) -> torch.Tensor:
    """``prod_{k<j} L_k`` for each coordinate ``j``: the place value of its digit, the first the least significant."""
    return torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0)


def mixed_radix(digits: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of grid digits (..., d) in ``[0, L)``: ``sum_j q_j prod_{k<j} L_k``, the first coordinate least significant."""
    return (digits.long() * radix_basis(levels)).sum(-1)


class FSQ(ImplicitQuantizer):
    """A fixed grid: bound each coordinate, round it to one of L_j values (straight-through); K = prod L, no loss.

    ``d = len(levels)`` coordinates, normalised to ``[-1, 1]``; token = mixed-radix digits (first coordinate least
    significant)."""

    linear_lookup = False  # tokens come from bound(P_in(z)): no stock VQModel form
    unused_options = ("beta", "max_search_elements")  # no loss, no search

    def __init__(self, num_codes: int, dim: int, *, levels: list[int] | None = None, bound: str = "tanh",
                 ifsq: bool = False, eps: float = 1e-3, **options):
        levels = resolve_levels(num_codes, levels)
        if min(levels) < 3:
            raise ValueError(f"fsq levels must be >= 3 (L = 2 gives the one-sided grid {{-1, 0}}); got {levels}")
        if bound not in ("tanh", "atanh"):
            raise ValueError(f"unknown fsq bound {bound!r}; valid: tanh (the authors' notebook), atanh "
                             "(vector-quantize-pytorch); iFSQ is ifsq=True")
        if ifsq and any(v % 2 == 0 for v in levels):
            raise ValueError(f"ifsq needs odd levels (its bound is symmetric, no half-step shift); got {levels}")
        self.bound = "ifsq" if ifsq else bound
        self.eps = float(eps)
        self._levels = levels
        super().__init__(math.prod(levels), dim, len(levels), **options)
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        self.register_buffer("edges", cell_edges(levels, self.bound, self.eps), persistent=False)

    def code_table(self) -> torch.Tensor:
        """Every grid point in index order: digit ``j`` of ``i`` is ``(i // prod_{k<j} L_k) mod L_j``."""
        levels = torch.tensor(self._levels)
        digits = (torch.arange(self.num_codes)[:, None] // radix_basis(levels)) % levels
        return ((digits - levels // 2) / (levels // 2)).float()

    def bounded(self, x: torch.Tensor) -> torch.Tensor:
        return fsq_bound(x, self._levels, self.bound, self.eps)

    def tokens(self, x):
        """Inference digits by the cell edges (the exported rule: the same tokens as ``round(bound(x))`` except
        within rounding error of an edge)."""
        return mixed_radix((x[:, :, None] > self.edges[None]).sum(-1), self.levels)

    def _train_step(self, z):
        b = self.bounded(self.project_in(z))
        rounded = torch.round(b)
        zhat = (b + (rounded - b).detach()) / (self.levels // 2)
        idx = mixed_radix(rounded + self.levels // 2, self.levels)
        return self.project_out(zhat), idx, z.new_zeros(())

    def extra_repr(self) -> str:
        return f"levels={self._levels}, bound={self.bound!r}, dim={self.dim}"
