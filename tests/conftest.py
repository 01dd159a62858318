"""Shared helpers: independent plain-tensor references for the quantizer tests."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch


# diffusers copies the remote code of loaded pipeline folders here: keep the user's cache out of the tests
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="vqgen-test-hf-modules-"))


def brute_nearest(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest code by explicit differences, no expansion trick: (N, K, D) in memory."""
    return ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1).argmin(1)


def flat(z: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (B*H*W, D) in the raster order the quantizers use."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def unflat(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    b, d, h, w = like.shape
    return x.view(b, h, w, d).permute(0, 3, 1, 2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def torchrun_two_ranks(worker: str, out_dir) -> tuple[dict, dict]:
    """Run ``tests/<worker>`` under ``torchrun --nproc_per_node 2`` (gloo on CPU); return both ranks' saved states."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(root / "tests" / worker), str(out_dir)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return tuple(torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in (0, 1))


def subprocess_env(**extra: str) -> dict:
    """The environment for CLI subprocesses: this checkout importable, one thread each."""
    import os
    from pathlib import Path

    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1", **extra}


def kill_when(cmd: list[str], marker, env: dict, timeout: float = 600) -> None:
    """Start ``cmd`` and SIGKILL it as soon as the file ``marker`` exists (or it exits, or time runs out)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
