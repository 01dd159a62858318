"""Two CPU processes (torchrun, gloo): EMA, k-means, SF-DiVeQ init and every replacement policy keep codebooks bit-identical."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from dist_worker import CASES

ROOT = Path(__file__).resolve().parents[1]


def test_two_ranks_hold_bit_identical_codebooks(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist_worker.py"), str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for case in CASES:
        assert r0[case].keys() == r1[case].keys()
        for key in r0[case]:
            assert torch.equal(r0[case][key], r1[case][key]), f"{case}: {key} differs across ranks"
        if case == "sf-diveq":
            assert r0[case]["data_initialized"], "SF-DiVeQ never left its warm-up, so it proves nothing"
        else:
            assert r0[case]["replaced"] > 0, f"{case}: the run never replaced a code, so it proves nothing"
