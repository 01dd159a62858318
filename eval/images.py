"""Checks and conversions for in-memory image batches: (N, 3, H, W) or grey (N, 1, H, W), uint8 or float in [0, 1]."""
from __future__ import annotations

import torch


def check_images(x, name: str = "images") -> torch.Tensor:
    """``x`` as a tensor, after refusing anything but a non-empty (N, 1|3, H, W) uint8 or [0, 1] float batch."""
    x = torch.as_tensor(x)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        hint = " (channels-last? permute to (N, C, H, W))" if x.ndim == 4 and x.shape[-1] in (1, 3) else ""
        raise ValueError(f"{name}: expected shape (N, 3, H, W) or (N, 1, H, W), got {tuple(x.shape)}{hint}")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name}: empty batch {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected uint8 or floating point, got {x.dtype}")
    lo, hi = float(x.min()), float(x.max())
    if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
        raise ValueError(f"{name}: float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
                         "(map [-1, 1] images with (x + 1) / 2, 0-255 floats with x / 255)")
    return x


def to_float01(x: torch.Tensor) -> torch.Tensor:
    """A checked batch as float32 in [0, 1]."""
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Grey (N, 1, H, W) repeated to three channels; RGB unchanged."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def check_pair(a, b, names: tuple[str, str] = ("a", "b")) -> tuple[torch.Tensor, torch.Tensor]:
    """Two checked batches of identical shape, for metrics that compare image i of ``a`` with image i of ``b``."""
    a, b = check_images(a, names[0]), check_images(b, names[1])
    if a.shape != b.shape:
        what = "grey vs RGB" if a.shape[1] != b.shape[1] else "shapes differ"
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape ({what}): "
                         f"{tuple(a.shape)} vs {tuple(b.shape)}")
    return a, b
