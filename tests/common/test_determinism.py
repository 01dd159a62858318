"""Same seed, same weights: a short tokenizer run and a short prior run, each twice, the second beside a CPU-busy
process, compared bitwise. Before torch's deterministic kernels were switched on, the tokenizer runs left 1e-7
differences in most tensors at two threads (the prior runs were already reproducible; their test keeps them so)."""
from __future__ import annotations

import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.helpers import subprocess_env, tiny_tokenizer_run

BUSY = "import torch\na = torch.randn(512, 512)\nwhile True:\n    a @ a"


def _run_twice(cmd_for, weights_for, tmp_path) -> tuple[dict, dict]:
    env = subprocess_env(OMP_NUM_THREADS="2")
    alone = subprocess.run(cmd_for(tmp_path / "alone"), env=env, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-2000:]
    busy = subprocess.Popen([sys.executable, "-c", BUSY], env=env)
    try:
        loaded = subprocess.run(cmd_for(tmp_path / "busy"), env=env, capture_output=True, text=True, timeout=600)
    finally:
        busy.kill()
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    return load_file(weights_for(tmp_path / "alone")), load_file(weights_for(tmp_path / "busy"))


def _assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not a[k].equal(b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


@pytest.mark.parametrize("quantizer", ["diveq", "vq"])
def test_a_tokenizer_run_repeats_bitwise_beside_a_busy_process(tmp_path, quantizer):
    def cmd(out):
        return [sys.executable, "-m", "study.cli", "--threads", "2", "train-tokenizer", "--quantizer", quantizer,
                "--data", "shapes", "--preset", "tiny", "--output-dir", str(out), "--max-steps", "12",
                "data.num_images=256", "train.sample_every=1000"]  # 32 px: large enough for torch to split ops over threads

    _assert_bitwise(*_run_twice(cmd, lambda out: out / "tokenizer" / "diffusion_pytorch_model.safetensors",
                                tmp_path))


def test_a_prior_run_repeats_bitwise_beside_a_busy_process(tmp_path):
    tok = tiny_tokenizer_run(tmp_path / "tok", "data.num_images=256")

    def cmd(out):
        return [sys.executable, "-m", "study.cli", "--threads", "2", "train-prior", "--kind", "ldm", "--tokenizer",
                str(tok), "--output-dir", str(out), "--max-steps", "8", "sample.num_samples=0",
                "train.checkpoint_every=1000", "train.val_every=1000", "train.batch_size=64"]  # the tiny preset's UNet

    _assert_bitwise(*_run_twice(cmd, lambda out: out / "unet" / "diffusion_pytorch_model.safetensors", tmp_path))
