"""The one nearest-code search every variant uses (docs/methods.md).

Squared Euclidean distance ``||z||^2 - 2 z C^T + ||C||^2`` evaluated in blocks of latents and of
codes, so the distance matrix held at once is at most ``max_elements`` entries, never ``N x K`` for
a whole batch. Ties go to the lowest index.

On CPU the blocks are cache-sized tiles (2,048 latents x 512 codes, 4 MiB) written into one reused
buffer, and a tile's argmin is taken only for the rows whose minimum it improves: ``amin`` is much
cheaper than ``min`` with indices there, and after the first few tiles few rows improve. That keeps
the search near the matmul limit ``2 N K D`` (``benchmarks/bench_quantizers.py``). On GPUs,
where a data-dependent row selection would synchronise with the host, each block keeps its argmin.
"""
from __future__ import annotations

import torch

DEFAULT_MAX_ELEMENTS = 1 << 22  # 4M distances (16 MiB in fp32) per block
CPU_TILE_CODES = 512  # codes per CPU tile: one tile row stays in L1/L2 while its minimum is taken
CPU_TILE_ELEMENTS = 1 << 20  # distances per CPU tile (4 MiB in fp32)


def block_sizes(num_rows: int, num_codes: int, max_elements: int = DEFAULT_MAX_ELEMENTS) -> tuple[int, int]:
    """(rows per block, codes per block) so that one block holds at most ``max_elements`` distances."""
    code_block = max(1, min(num_codes, max_elements))
    row_block = max(1, min(num_rows, max_elements // code_block))
    return row_block, code_block


def search_plan(device: torch.device, num_rows: int, num_codes: int, max_elements: int):
    """(rows per block, codes per block, how a block's minimum joins the running one) for ``device``."""
    if device.type == "cpu":
        return (*block_sizes(num_rows, min(num_codes, CPU_TILE_CODES), min(max_elements, CPU_TILE_ELEMENTS)),
                _improving_rows_min)
    return (*block_sizes(num_rows, num_codes, max_elements), _merged_min)


@torch.no_grad()
def nearest_code(
    z: torch.Tensor, codebook: torch.Tensor, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and squared distance to the nearest row of ``codebook`` (K, D) for each row of ``z`` (N, D)."""
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest_code needs z (N, D) and codebook (K, D); got {tuple(z.shape)} and {tuple(codebook.shape)}")
    z = z.detach().float()  # distances in fp32 even under autocast: bf16 ties would reorder codes
    codebook = codebook.detach().float()
    n, k = z.shape[0], codebook.shape[0]
    row_block, code_block, tile_min = search_plan(z.device, n, k, max_elements)
    code_sq = codebook.pow(2).sum(1)
    buffer = torch.empty(row_block * code_block, dtype=z.dtype, device=z.device)
    best_dist = torch.empty(n, dtype=z.dtype, device=z.device)
    best_idx = torch.empty(n, dtype=torch.long, device=z.device)
    for r0 in range(0, n, row_block):
        zr = z[r0 : r0 + row_block]
        run_dist = run_idx = None
        for c0 in range(0, k, code_block):
            codes = codebook[c0 : c0 + code_block]
            out = buffer[: len(zr) * len(codes)].view(len(zr), len(codes))  # contiguous, reused
            # ||C||^2 - 2 z C^T in one fused op; ||z||^2 is constant per row and added at the end
            d = torch.addmm(code_sq[c0 : c0 + code_block], zr, codes.T, alpha=-2.0, out=out)
            if run_dist is None:
                run_dist, run_idx = d.min(dim=1)  # first minimum -> lowest index within the block
            else:
                run_dist, run_idx = tile_min(d, c0, run_dist, run_idx)
        best_dist[r0 : r0 + row_block] = (run_dist + zr.pow(2).sum(1)).clamp_min_(0)
        best_idx[r0 : r0 + row_block] = run_idx
    return best_idx, best_dist


def _merged_min(d, c0, run_dist, run_idx):
    """Every row's block minimum merged into the running one (no data-dependent shapes: no host sync)."""
    dist, idx = d.min(dim=1)
    better = dist < run_dist  # strict: an earlier block keeps ties
    return torch.where(better, dist, run_dist), torch.where(better, idx + c0, run_idx)


def _improving_rows_min(d, c0, run_dist, run_idx):
    """The tile's argmin only for the rows whose running minimum it strictly beats (an earlier tile keeps ties)."""
    dist = torch.amin(d, dim=1)
    rows = (dist < run_dist).nonzero()[:, 0]
    if len(rows):
        run_idx[rows] = d[rows].argmin(dim=1) + c0  # first minimum -> lowest index within the tile
        run_dist[rows] = dist[rows]
    return run_dist, run_idx
