"""Two CPU processes (torchrun, gloo): EMA, k-means, SF-DiVeQ init and every replacement policy keep codebooks bit-identical."""

import torch

from tests.helpers import torchrun_two_ranks
from tests.stage1_tokenizer.quantizers.dist_worker import CASES


def test_two_ranks_hold_bit_identical_codebooks(tmp_path):
    r0, r1 = torchrun_two_ranks("stage1_tokenizer/quantizers/dist_worker.py", tmp_path)
    for case in CASES:
        assert r0[case].keys() == r1[case].keys()
        for key in r0[case]:
            assert torch.equal(r0[case][key], r1[case][key]), f"{case}: {key} differs across ranks"
        if case == "sf-diveq":
            assert r0[case]["data_initialized"], "SF-DiVeQ never left its warm-up, so it proves nothing"
        else:
            assert r0[case]["replaced"] > 0, f"{case}: the run never replaced a code, so it proves nothing"
