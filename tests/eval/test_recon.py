"""eval.recon against scikit-image called directly, rFID through eval.fid, and the input errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from eval.fid import fid
from eval.recon import psnr, rfid, ssim


def pair(n=3, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 256, (n, channels, 32, 32), generator=g, dtype=torch.uint8)
    noise = torch.randint(-20, 21, a.shape, generator=g)
    return a, (a.int() + noise).clamp(0, 255).to(torch.uint8)


def skimage_mean(metric, a, b, **kw):
    """The metric on uint8 (H, W, C) arrays with data_range=255, averaged over images."""
    a, b = (x.permute(0, 2, 3, 1).numpy() for x in (a, b))
    return np.mean([metric(x, y, data_range=255, **kw) for x, y in zip(a, b)])


def test_psnr_and_ssim_match_skimage_for_uint8_and_float():
    a, b = pair()
    want_psnr = skimage_mean(peak_signal_noise_ratio, a, b)
    want_ssim = skimage_mean(structural_similarity, a, b, channel_axis=-1)
    for x, y in ((a, b), (a.float() / 255, b.float() / 255), (a.double() / 255, b)):
        assert psnr(x, y) == pytest.approx(want_psnr, rel=1e-6)
        assert ssim(x, y) == pytest.approx(want_ssim, rel=1e-5)


def test_grey_images():
    a, b = pair(channels=1)
    want = np.mean([structural_similarity(x[0].numpy(), y[0].numpy(), data_range=255) for x, y in zip(a, b)])
    assert ssim(a, b) == pytest.approx(want, rel=1e-6)
    assert psnr(a, b) == pytest.approx(skimage_mean(peak_signal_noise_ratio, a, b), rel=1e-9)


def test_identical_images():
    a, _ = pair()
    assert ssim(a, a) == 1.0
    with np.errstate(divide="ignore"):
        assert psnr(a, a) == float("inf")


def test_bad_inputs():
    a, b = pair()
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, b[:2])
    with pytest.raises(ValueError, match="grey vs RGB"):
        ssim(a, b[:, :1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ssim(a.float() / 127.5 - 1, b.float() / 127.5 - 1)
    with pytest.raises(ValueError, match="channels-last"):
        psnr(a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1))


def test_rfid_scores_a_reconstruction_pipeline():
    a, _ = pair(n=4)

    def washed_out(x):  # a stand-in autoencoder
        return x // 2 + 64

    def batches():
        return iter([a[:2], a[2:]])
    got = rfid(batches, washed_out, device="cpu", progress=False)
    assert got > 1
    assert got == pytest.approx(fid(a, washed_out(a), device="cpu", progress=False), rel=1e-4)
    with pytest.raises(ValueError, match="same shape"):
        rfid(batches, lambda x: x[:, :, :16], device="cpu", progress=False)
