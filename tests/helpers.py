"""Test helpers: plain-tensor references for the quantizers, small configs, subprocess and kill helpers."""
from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from stage1_tokenizer.config import TokenizerConfig, load_tokenizer_config
from stage1_tokenizer.train import train_tokenizer
from stage2_prior.config import PriorConfig, load_prior_config

ROOT = Path(__file__).resolve().parents[1]


def project_packages() -> list[str]:
    """The top-level packages the wheel ships, as ``pyproject.toml`` lists them (``include = [...]``)."""
    text = (ROOT / "pyproject.toml").read_text()
    return [p.rstrip("*") for p in ast.literal_eval(re.search(r"^include = (\[.*\])$", text, re.M).group(1))]


def brute_nearest(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest code by explicit differences, no expansion trick: (N, K, D) in memory."""
    return ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1).argmin(1)


def flat(z: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (B*H*W, D) in the raster order the quantizers use."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def unflat(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`flat` for a tensor shaped like ``like``."""
    b, d, h, w = like.shape
    return x.view(b, h, w, d).permute(0, 3, 1, 2)


def torchrun_two_ranks(worker: str, out_dir) -> tuple[dict, dict]:
    """Run ``tests/<worker>`` under ``torchrun --nproc_per_node 2`` (gloo on CPU); return both ranks' saved states."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / worker), str(out_dir)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return tuple(torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in (0, 1))


def subprocess_env(**extra: str) -> dict:
    """The environment for CLI subprocesses: this checkout importable, one thread each."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def kill_when(cmd: list[str], marker, env: dict, timeout: float = 600) -> None:
    """Start ``cmd`` and SIGKILL it as soon as the file ``marker`` exists (or it exits, or time runs out)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# --- small configs: 16x16 shapes, a two-level encoder, a few steps -------------------------------
SMALL = ["model.resolution=16", "model.block_out_channels=[16, 16]", "model.latent_channels=8",
         "model.vq_embed_dim=8", "model.norm_num_groups=4", "quantizer.num_codes=32", "data.num_images=256",
         "train.batch_size=16", "train.log_every=1", "train.sample_every=1000", "train.lr=2e-3"]


def small_config(*overrides: str) -> TokenizerConfig:
    """The tiny tokenizer preset shrunk to 16x16 images for tests."""
    return load_tokenizer_config("tiny", SMALL + list(overrides))


TINY_GPT = ["gpt.n_layer=2", "gpt.n_head=2", "gpt.n_embd=64", "gpt.dropout=0.0", "train.batch_size=16",
            "train.log_every=1", "train.sample_every=1000", "train.checkpoint_every=1000", "train.warmup_steps=5",
            "sample.num_samples=4"]
TINY_LDM = ["ldm.block_out_channels=[32, 32]", "ldm.layers_per_block=1", "ldm.attention_levels=[1]",
            "ldm.norm_num_groups=8", "ldm.num_inference_steps=5", "train.batch_size=16", "train.log_every=1",
            "train.sample_every=1000", "train.checkpoint_every=1000", "train.warmup_steps=5", "sample.num_samples=4"]


def tiny_tokenizer_run(out: Path, *overrides: str) -> Path:
    """A 16x16 shapes tokenizer (8x8 tokens, K = 32) trained for 20 steps on 32 images."""
    train_tokenizer(small_config("train.max_steps=20", "train.checkpoint_every=1000", "data.num_images=32",
                                 *overrides), out)
    return out


def prior_config(kind: str, tokenizer: Path, *overrides: str) -> PriorConfig:
    """A tiny GPT or LDM on ``tokenizer``'s codes."""
    base = TINY_GPT if kind == "gpt" else TINY_LDM
    return load_prior_config(kind, "tiny", [f"tokenizer={tokenizer}", *base, *overrides])


# --- archived runs for the study's report and claims ----------------------------------------------
def fake_run(root: Path, quantizer: str, k: int, seed: int, freeze_at: int | None = None, drift: float = 0.5,
             replaced: int | None = None, gpt_gfid: float | None = None, usage_epoch: list[float] | None = None,
             **metrics) -> Path:
    """An archived run as the sweep leaves it: config, metrics curve, eval.json, generation.json."""
    name = f"{quantizer}{'-staged' if freeze_at else ''}-K{k}-s{seed}"
    run = root / name
    run.mkdir(parents=True)
    cfg = {"quantizer": {"name": quantizer, "num_codes": k}, "train": {"seed": seed},
           "schedule": {"freeze_encoder_at": freeze_at}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    curve = []
    for step in range(0, 400, 10):
        row = {"step": step, "usage": 0.5, "drift": 0.0 if freeze_at and step >= freeze_at else drift}
        if replaced is not None:
            row["replaced_total"] = replaced * step // 390
        curve.append(row)
    for epoch, used in enumerate(usage_epoch or []):  # logged at each epoch's end, as training does
        curve.append({"step": 100 * (epoch + 1), "usage_epoch": used, "epoch": epoch})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in curve))
    defaults = {"rfid": 100.0, "lpips_vgg": 0.1, "psnr": 20.0, "ssim": 0.8, "usage": 0.5}
    (run / "eval.json").write_text(json.dumps({**defaults, **metrics}))
    gpt = 150.0 + seed if gpt_gfid is None else gpt_gfid
    (run / "generation.json").write_text(json.dumps({"gpt": {"gfid": gpt}, "ldm": {"gfid": 160.0}}))
    return run
