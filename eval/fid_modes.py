"""clean-fid's three FID protocols: how an image reaches the Inception network's 299 x 299 input.

- ``clean`` (the default): PIL bicubic with antialiasing, per channel, on float pixels (clean-fid's own
  protocol; Parmar et al. 2022).
- ``legacy_tensorflow``: TensorFlow 1's ``resize_bilinear`` (no antialiasing, source pixel = output pixel x
  in/out), which the TF Inception graph does inside itself: the protocol of the original FID code and of the ADM
  evaluator most generation papers (LlamaGen, DiT) report with. The offline weights hold the layers without
  that resize, so it is done here.
- ``legacy_pytorch``: pytorch-fid's ``F.interpolate`` bilinear (``align_corners=False``, no antialiasing) and
  its input scaling ``2 x / 255 - 1`` in place of ``(x - 128) / 128``, on the same network layers (pytorch-fid's
  weights are a conversion of the same TF graph).

Each maps an (H, W, 3) float32 image in [0, 255] to the (299, 299, 3) array the network takes as ``(x - 128) / 128``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from cleanfid.resize import build_resizer

SIZE = 299
FID_MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")
_CLEAN = build_resizer("clean")


def tf1_resize_bilinear(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """TensorFlow 1.x ``tf.image.resize_bilinear(align_corners=False)`` of (N, C, H, W) floats: source coordinate
    ``out * (in / out)`` in float32, lerp along the width, then along the height, as TF's kernel does."""
    def axis(n_in: int):
        src = torch.arange(size, dtype=torch.float32) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.floor().long().clamp(max=n_in - 1)
        return lo, (lo + 1).clamp(max=n_in - 1), (src - lo).to(x.dtype)

    (y0, y1, fy), (x0, x1, fx) = axis(x.shape[2]), axis(x.shape[3])
    top_left, top_right = x[:, :, y0][..., x0], x[:, :, y0][..., x1]
    bottom_left, bottom_right = x[:, :, y1][..., x0], x[:, :, y1][..., x1]
    top = top_left + (top_right - top_left) * fx
    bottom = bottom_left + (bottom_right - bottom_left) * fx
    return top + (bottom - top) * fy[:, None]


def _legacy_tensorflow(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).permute(2, 0, 1)[None]
    return tf1_resize_bilinear(t)[0].permute(1, 2, 0).numpy()


def _legacy_pytorch(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).permute(2, 0, 1)[None]
    y = F.interpolate(t, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 255)
    # pytorch-fid feeds 2 y / 255 - 1; the network computes (y' - 128) / 128, which equals it for y' = y 256 / 255
    return (y[0].permute(1, 2, 0) * (256 / 255)).numpy()


def resizer(mode: str):
    """The (H, W, 3) -> (299, 299, 3) map of a protocol; a clear error for an unknown one."""
    if mode not in FID_MODES:
        raise ValueError(f"unknown FID mode {mode!r}; choose from {', '.join(FID_MODES)}")
    return {"clean": _CLEAN, "legacy_tensorflow": _legacy_tensorflow, "legacy_pytorch": _legacy_pytorch}[mode]
