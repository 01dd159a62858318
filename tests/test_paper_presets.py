"""Every paper-scale preset runs at its true resolution on a CPU: two steps at batch 2 through the tokenizer, its
code cache, both priors, the export and 4 samples, so shape, memory and config errors surface here."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from common.config_loader import preset_names, presets
from pipelines.export import export_prior
from pipelines.sample import load_pipeline, write_samples
from stage1_tokenizer.config import load_tokenizer_config
from stage1_tokenizer.train import train_tokenizer
from stage2_prior.codes import encode_run
from stage2_prior.config import load_prior_config
from stage2_prior.train import train_prior

TOKENIZERS = ("celeba-hq", "vqgan-f16", "nsvq2026")  # the papers' settings, at their sizes
PRIORS = (("gpt", "celeba-hq"), ("gpt", "afhq"), ("ldm", "celeba-hq"))  # on the f16 tokenizer they were made for
SMALL = {"tokenizer": {"tiny", "mnist", "rgb64", "tiny-nsvq2026", "mnist-nsvq2026"}, "gpt": {"tiny"}, "ldm": {"tiny"}}
SMOKE = ["train.batch_size=2", "train.max_steps=2", "train.epochs=null", "train.log_every=1",
         "train.checkpoint_every=1000", "train.sample_every=1000"]
TOKENIZER_SMOKE = [*SMOKE, "data.num_workers=0", "schedule.probe_size=2"]  # a 2-image drift probe and grid
PRIOR_SMOKE = [*SMOKE, "train.warmup_steps=1", "train.val_every=1000", "sample.num_samples=0"]  # the 4 samples:
# from the exported pipeline (a 355M GPT's grid at the end of training would cost another minute)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six 256x256 colour images: the size of CelebA-HQ and of the f16 tokenizer's input."""
    root = tmp_path_factory.mktemp("paper-data")
    rng = np.random.default_rng(0)
    for i in range(6):
        base = np.linspace(0, 255, 256)[None, :, None] * rng.uniform(0.2, 1.0, 3)
        pixels = (base + rng.normal(0, 20, (256, 256, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"face{i:02d}.png")
    return root


_RUNS: dict = {}


def _tokenizer(preset: str, images, root):
    """The preset trained for two steps at batch 2 (its discriminator and encoder freeze switched on from step 1)."""
    if preset not in _RUNS:
        cfg = load_tokenizer_config(preset, [*TOKENIZER_SMOKE, f"data.source={images}"])
        extra = ["loss.disc_start=1"] if cfg.loss.disc_weight > 0 else []
        extra += ["schedule.freeze_encoder_at=1"] if cfg.schedule.freeze_encoder_at is not None else []
        cfg = load_tokenizer_config(preset, [*TOKENIZER_SMOKE, f"data.source={images}", *extra])
        train_tokenizer(cfg, root / preset)
        _RUNS[preset] = (cfg, root / preset)
    return _RUNS[preset]


def test_every_shipped_preset_is_small_or_smoke_tested():
    assert set(preset_names(presets("stage1_tokenizer", "tokenizer"))) == SMALL["tokenizer"] | set(TOKENIZERS)
    for kind in ("gpt", "ldm"):
        assert set(preset_names(presets("stage2_prior", kind))) == SMALL[kind] | {p for k, p in PRIORS if k == kind}


@pytest.mark.parametrize("preset", TOKENIZERS)
def test_paper_tokenizer_preset_trains_and_encodes_at_its_size(preset, images, tmp_path_factory):
    cfg, run = _tokenizer(preset, images, tmp_path_factory.mktemp("tok"))
    cache = encode_run(run, batch_size=2)
    grid = cfg.model.resolution // 2 ** (len(cfg.model.block_out_channels) - 1)
    assert tuple(cache.indices.shape[1:]) == (grid, grid) and cache.num_codes == cfg.quantizer.num_codes
    assert int(cache.indices.max()) < cfg.quantizer.num_codes


@pytest.mark.parametrize("kind,preset", PRIORS)
def test_paper_prior_preset_trains_exports_and_samples(kind, preset, images, tmp_path_factory, tmp_path):
    tok_cfg, tok = _tokenizer("vqgan-f16", images, tmp_path_factory.mktemp("tok"))
    cfg = load_prior_config(kind, preset, [f"tokenizer={tok}", *PRIOR_SMOKE])
    train_prior(cfg, tmp_path / "prior")
    pipe, sidecar = load_pipeline(export_prior(tmp_path / "prior", tmp_path / "pipe"))
    out = write_samples(pipe, sidecar, 4, tmp_path / "samples", batch_size=4, seed=0)
    pngs = sorted(p for p in out.glob("*.png") if p.name != "grid.png")
    assert len(pngs) == 4
    with Image.open(pngs[0]) as img:
        assert img.size == (tok_cfg.model.resolution,) * 2 and img.mode == "RGB"
    for folder in ("prior", "pipe"):  # a 355M GPT's checkpoint and export are gigabytes: free them at once
        shutil.rmtree(tmp_path / folder)
