"""The one nearest-code search every variant uses (METHODS "Shared machinery").

Squared Euclidean distance ``||z||^2 - 2 z C^T + ||C||^2`` evaluated in blocks of latents (and of
codes when K is large) so the distance matrix held at once is at most ``max_elements`` entries,
never ``N x K`` for a whole batch. Ties go to the lowest index.
"""
from __future__ import annotations

import torch

DEFAULT_MAX_ELEMENTS = 1 << 22  # 4M distances (16 MiB in fp32) per block


def block_sizes(num_rows: int, num_codes: int, max_elements: int = DEFAULT_MAX_ELEMENTS) -> tuple[int, int]:
    """(rows per block, codes per block) so that one block holds at most ``max_elements`` distances."""
    code_block = max(1, min(num_codes, max_elements))
    row_block = max(1, min(num_rows, max_elements // code_block))
    return row_block, code_block


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
    row_block, code_block = block_sizes(n, k, max_elements)
    code_sq = codebook.pow(2).sum(1)
    best_dist = torch.empty(n, dtype=z.dtype, device=z.device)
    best_idx = torch.empty(n, dtype=torch.long, device=z.device)
    for r0 in range(0, n, row_block):
        zr = z[r0 : r0 + row_block]
        run_dist = run_idx = None
        for c0 in range(0, k, code_block):
            # ||C||^2 - 2 z C^T in one fused op; ||z||^2 is constant per row and added at the end
            d = torch.addmm(code_sq[c0 : c0 + code_block], zr, codebook[c0 : c0 + code_block].T, alpha=-2.0)
            dist, idx = d.min(dim=1)  # first minimum -> lowest index within the block
            if run_dist is None:
                run_dist, run_idx = dist, idx
            else:
                better = dist < run_dist  # strict: an earlier block keeps ties
                run_dist = torch.where(better, dist, run_dist)
                run_idx = torch.where(better, idx + c0, run_idx)
        best_dist[r0 : r0 + row_block] = (run_dist + zr.pow(2).sum(1)).clamp_min_(0)
        best_idx[r0 : r0 + row_block] = run_idx
    return best_idx, best_dist
