"""Reconstruction metrics of a tokenizer: PSNR and SSIM (scikit-image definitions, per image then averaged), rFID.

Inputs are (N, 3|1, H, W) batches, uint8 or float in [0, 1]; both are scored as float64 in [0, 1] with
data_range=1, which equals scikit-image on uint8 with data_range=255 (both metrics are scale invariant).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from .fid import fid
from .images import check_pair


def _pairs(reference, test) -> tuple[np.ndarray, np.ndarray]:
    """Two same-shape batches as float64 (N, H, W, C) arrays in [0, 1]."""
    pair = check_pair(reference, test, ("reference", "test"))
    return tuple((x.double() / 255 if x.dtype == torch.uint8 else x.double()).permute(0, 2, 3, 1).cpu().numpy()
                 for x in pair)


def psnr(reference, test) -> float:
    """Mean over images of skimage's PSNR (dB); inf if any pair is identical."""
    r, t = _pairs(reference, test)
    return float(np.mean([peak_signal_noise_ratio(x, y, data_range=1.0) for x, y in zip(r, t)]))


def ssim(reference, test) -> float:
    """Mean over images of skimage's SSIM (default 7x7 uniform window; RGB channels averaged)."""
    r, t = _pairs(reference, test)
    if r.shape[-1] == 1:
        r, t = r[..., 0], t[..., 0]
    axis = -1 if r.ndim == 4 else None
    return float(np.mean([structural_similarity(x, y, data_range=1.0, channel_axis=axis) for x, y in zip(r, t)]))


def rfid(originals: Callable[[], Iterable[torch.Tensor]], reconstruct: Callable[[torch.Tensor], torch.Tensor],
         **kwargs) -> float:
    """rFID of an autoencoder: FID between the batches ``originals()`` yields and ``reconstruct`` of each, with no
    images written (``originals`` is called twice, once per feature pass). Batches and reconstructions are uint8
    or float in [0, 1] (clamp the decoder output); ``kwargs`` (num_images, batch_size, device, ...) go to
    ``eval.fid.extract_features``."""
    def reconstructions():
        for x in originals():
            y = reconstruct(x)
            check_pair(x, y, ("original batch", "its reconstruction"))
            yield y
    return fid(reconstructions, originals, **kwargs)  # reconstructions first: a bad one fails before any work
