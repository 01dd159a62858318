"""The data decides the tokenizer's input shape; what the user typed is kept and contradictions are warned."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import yaml
from PIL import Image

from stage1_tokenizer.config import load_tokenizer_config
from stage1_tokenizer.data import build_dataset, decode
from stage1_tokenizer.data_fit import downsampling_blocks, fit_to_data, inspect_data, standard_resolution, typed_fields
from tests.helpers import subprocess_env


def _folder(root, n: int, size: tuple[int, int], colour: bool, start: int = 0):
    """``n`` PNGs of ``size`` (width, height), colour noise or grey noise."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(n):
        w, h = size
        pixels = rng.integers(0, 256, (h, w, 3) if colour else (h, w), dtype=np.uint8)
        Image.fromarray(pixels, "RGB" if colour else "L").save(root / f"img{start + i:03d}.png")
    return root


def test_decode_composites_alpha_on_white_scales_16_bit_and_expands_palettes():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    out = np.asarray(decode(rgba, 3))
    assert out[0, 0].tolist() == [10, 20, 30] and out[1, 1].tolist() == [255, 255, 255]
    half = np.asarray(decode(Image.new("RGBA", (1, 1), (0, 0, 0, 128)), 3))[0, 0]
    assert half.tolist() == [127, 127, 127]  # 255 * (1 - 128/255) over black
    deep = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))  # PIL mode I;16
    assert deep.mode.startswith("I;16")
    assert np.asarray(decode(deep, 1)).tolist() == [[0, 128, 255]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([200, 0, 0, 0, 0, 200])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1  # the second entry is transparent
    assert np.asarray(decode(palette, 3)).tolist() == [[[200, 0, 0], [255, 255, 255]]]
    grey = np.asarray(decode(Image.new("RGB", (1, 1), (255, 0, 0)), 1))
    assert grey.tolist() == [[76]]  # ITU-R 601 luma of pure red: 0.299 * 255


def test_the_rule_for_resolution_and_depth():
    # nearest standard size on a log scale; beyond 256 px, 256
    assert [standard_resolution(s) for s in (20, 28, 45, 48, 64, 90, 100, 182, 256, 1024)] == \
        [32, 32, 32, 64, 64, 64, 128, 256, 256, 256]
    # 8x8 tokens at 32-64 px, 16x16 at 128-256 px
    for resolution, grid in ((32, 8), (64, 8), (128, 16), (256, 16)):
        assert resolution // 2 ** downsampling_blocks(resolution) == grid
    assert 48 % 2 ** downsampling_blocks(48) == 0  # a typed odd size still divides


def test_colour_folder_gives_three_channels_at_its_size_and_grey_folder_one(tmp_path):
    colour = inspect_data(str(_folder(tmp_path / "colour", 6, (64, 64), True)))
    grey = inspect_data(str(_folder(tmp_path / "grey", 6, (32, 32), False)))
    default = load_tokenizer_config("tiny")  # 3 channels, 32 px: a default that must yield
    cfg, fit = fit_to_data(default, colour, {})
    assert (cfg.model.in_channels, cfg.model.resolution) == (3, 64) and fit["tokens"] == 8
    assert cfg.model.block_out_channels == [*default.model.block_out_channels, default.model.block_out_channels[-1]]
    assert fit["from"]["in_channels"] == "data" and not fit["warnings"]
    cfg, fit = fit_to_data(default, grey, {})
    assert (cfg.model.in_channels, cfg.model.resolution, fit["tokens"]) == (1, 32, 8)
    assert "grey" in fit["message"] and "(from the data)" in fit["message"]
    x, _ = build_dataset(str(tmp_path / "colour"), cfg.model.resolution, 3)[0]
    assert x.shape == (3, 32, 32)


def test_a_contradicting_typed_setting_is_kept_and_warned_in_one_line(tmp_path):
    colour = inspect_data(str(_folder(tmp_path / "colour", 4, (256, 256), True)))
    typed = typed_fields([], "--preset mnist")
    cfg, fit = fit_to_data(load_tokenizer_config("mnist"), colour, typed)
    assert (cfg.model.in_channels, cfg.model.resolution) == (1, 32)  # honoured
    assert "\n" not in fit["message"] and "WARNING" in fit["message"]
    assert "model.in_channels=3 keeps colour" in fit["message"]
    assert "resized to 32 px" in fit["message"] and "model.resolution=256" in fit["message"]
    # an override names itself and fixes only its own field
    typed = typed_fields(["model.in_channels=3", "train.lr=1e-3"], None)
    assert typed == {"in_channels": "model.in_channels=3"}
    grey = inspect_data(str(_folder(tmp_path / "grey", 4, (64, 64), False)))
    cfg, fit = fit_to_data(load_tokenizer_config("tiny", ["model.in_channels=3"]), grey, typed)
    assert (cfg.model.in_channels, cfg.model.resolution) == (3, 64)
    assert "model.in_channels=1" in fit["warnings"][0]


def test_mixed_sizes_non_square_alpha_palette_and_16_bit_are_counted(tmp_path):
    root = _folder(tmp_path / "mixed", 3, (64, 64), True)
    _folder(root, 2, (40, 30), True, start=10)  # non-square, another size
    Image.new("RGBA", (64, 64), (255, 0, 0, 100)).save(root / "alpha.png")
    Image.new("P", (64, 64)).save(root / "palette.png")
    Image.fromarray(np.full((48, 48), 40000, dtype=np.uint16)).save(root / "deep.png")
    (root / "broken.png").write_bytes(b"not a png")
    profile = inspect_data(str(root))
    assert (profile.sampled, profile.unreadable, profile.images) == (8, 1, 9)
    assert (profile.sizes, profile.non_square, profile.alpha, profile.palette, profile.sixteen_bit) == (3, 2, 1, 1, 1)
    assert (profile.short_min, profile.short_max) == (30, 64)
    _, fit = fit_to_data(load_tokenizer_config("tiny"), profile, {})
    line = fit["message"]
    for words in ("3 sizes", "2 non-square", "1 with transparency (composited on white)", "1 palette", "1 16-bit",
                  "1 unreadable"):
        assert words in line, (words, line)


def test_a_folder_with_train_and_test_subfolders_uses_them_as_splits(tmp_path):
    _folder(tmp_path / "set" / "train" / "a", 5, (16, 16), True)
    _folder(tmp_path / "set" / "test" / "b", 2, (16, 16), True, start=50)
    train = build_dataset(str(tmp_path / "set"), 16, 3, "train", holdout=0.5)
    test = build_dataset(str(tmp_path / "set"), 16, 3, "test", holdout=0.5)
    assert (len(train), len(test)) == (5, 2)
    assert {p.parent.name for p in train.files} == {"a"} and {p.parent.name for p in test.files} == {"b"}
    assert inspect_data(str(tmp_path / "set")).images == 5  # the profile reads the training split


def test_cli_fits_a_colour_folder_records_it_and_warns_on_a_grey_preset(tmp_path):
    data = _folder(tmp_path / "colour", 40, (64, 64), True)
    base = [sys.executable, "-m", "study.cli", "train-tokenizer", "--data", str(data), "--max-steps", "1",
            "train.batch_size=4", "train.log_every=1", "train.sample_every=100", "train.checkpoint_every=100"]
    fitted = subprocess.run([*base, "--output-dir", str(tmp_path / "fit")], capture_output=True, text=True,
                            env=subprocess_env(), timeout=600)
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    lines = [line for line in fitted.stderr.splitlines() if line.startswith("vqgen: data")]
    assert len(lines) == 1 and "in_channels=3, resolution 64 px" in lines[0]
    run = json.loads((tmp_path / "fit" / "run.json").read_text())
    assert run["data_fit"]["in_channels"] == 3 and run["data_fit"]["resolution"] == 64
    kept = subprocess.run([*base, "--preset", "mnist", "--output-dir", str(tmp_path / "kept")], capture_output=True,
                          text=True, env=subprocess_env(), timeout=600)
    assert kept.returncode == 0, kept.stderr[-2000:]
    warned = [line for line in kept.stderr.splitlines() if "WARNING" in line]
    assert len(warned) == 1 and "model.in_channels=3" in warned[0] and "--preset mnist" in warned[0]
    assert yaml.safe_load((tmp_path / "kept" / "config.yaml").read_text())["model"]["in_channels"] == 1


def test_bundled_sources_keep_their_presets():
    cfg = load_tokenizer_config("mnist")
    assert inspect_data("shapes") is None and fit_to_data(cfg, None, {}) == (cfg, None)
    fitted, fit = fit_to_data(cfg, inspect_data("mnist"), {})  # grey 28 px: the mnist preset's own shape
    assert fitted == cfg and fit["tokens"] == 8 and not fit["warnings"]
