"""Shared helpers: independent plain-tensor references for the quantizer tests."""
from __future__ import annotations

import pytest
import torch


def brute_nearest(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest code by explicit differences, no expansion trick: (N, K, D) in memory."""
    return ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1).argmin(1)


def flat(z: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (B*H*W, D) in the raster order the quantizers use."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def unflat(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    b, d, h, w = like.shape
    return x.view(b, h, w, d).permute(0, 3, 1, 2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
