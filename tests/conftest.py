"""Fixtures every test shares: a fixed seed, and the user's caches kept out of the tests."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

# diffusers copies the remote code of loaded pipeline folders here: keep the user's cache out of the tests
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="vqgen-test-hf-modules-"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
