"""clean-fid's three FID protocols: the TensorFlow-1 resize against torch-fidelity's and hand-computed values, the
others against clean-fid's own resizers, and modes that never share features."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from cleanfid.resize import build_resizer
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from eval import fid_cache
from eval.fid import Features, extract_features
from eval.fid_cache import cache_entries, reference_features
from eval.fid_modes import FID_MODES, resizer, tf1_resize_bilinear
from study.cli import main
from study.sweep import SweepConfig
from tests.eval.test_fid import waves


def test_the_tensorflow_resize_by_hand():
    """2x2 -> 4x4: source = out x 1/2, the last rows and columns repeat the edge (TF1 has no half-pixel centres)."""
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]])[None, None]
    expected = torch.tensor([[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30.0]])
    torch.testing.assert_close(tf1_resize_bilinear(x, 4)[0, 0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(32, 32), (28, 28), (64, 48), (400, 350)])
def test_the_tensorflow_resize_equals_torch_fidelitys(shape):
    x = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(0)) * 255
    ours = tf1_resize_bilinear(x)
    theirs = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert ours.shape == (2, 3, 299, 299)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * 255)


def test_clean_and_legacy_pytorch_are_clean_fids_resizers():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(resizer("clean")(image), build_resizer("clean")(image))
    # pytorch-fid feeds 2 y / 255 - 1 where the network computes (y' - 128) / 128: y' = y 256 / 255
    np.testing.assert_allclose(resizer("legacy_pytorch")(image), build_resizer("legacy_pytorch")(image) * 256 / 255,
                               rtol=1e-6, atol=1e-4)
    with pytest.raises(ValueError, match="unknown FID mode 'tf'"):
        resizer("tf")


def test_modes_give_other_features_and_never_share_a_cache_entry(tmp_path, monkeypatch):
    images = waves(3, 0)
    clean, legacy = (extract_features(images, progress=False, mode=m).array for m in ("clean", "legacy_tensorflow"))
    assert not np.allclose(clean, legacy, atol=1e-3), "the resize changes the features"
    calls = []

    def extract(source, num_images, mode="clean", **kw):
        calls.append(mode)
        return Features(torch.as_tensor(source)[:num_images].reshape(num_images, -1)[:, :8].double().numpy())

    monkeypatch.setattr(fid_cache, "extract_features", extract)
    for mode in (*FID_MODES, "clean"):
        reference_features(images, "toy", 32, 3, tmp_path, mode=mode)
    assert calls == list(FID_MODES) and sorted(e["mode"] for e in cache_entries(tmp_path)) == sorted(FID_MODES)


def test_the_mode_is_checked_where_it_is_given():
    with pytest.raises(ValueError, match="unknown fid_mode"):
        SweepConfig(fid_mode="tensorflow")
    with pytest.raises(SystemExit):
        main(["fid", "a", "b", "--fid-mode", "tensorflow"])
