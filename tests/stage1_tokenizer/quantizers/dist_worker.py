"""Run under ``torchrun --nproc_per_node 2`` (gloo): trains quantizers on different data per rank
and writes every rank's codebook state to OUT_DIR/rank{r}.pt for the test to compare."""
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from stage1_tokenizer.quantizers import QUANTIZERS, build_quantizer

CASES = {  # name -> options: EMA statistics, every replacement policy, k-means init
    "ema": dict(replacement="importance", replace_every=5, kmeans_init=True),
    "vq-importance": dict(replacement="importance", replace_every=5),
    "vq-random-used": dict(replacement="random-used", replace_every=5),
    "vq-reservoir": dict(replacement="reservoir", replace_every=5, reservoir_size=64),
    "rotation-ema": dict(ema=True, replacement="importance", replace_every=5),
    "sf-diveq": dict(warmup=5, init_batches=3),  # codebook initialised from each rank's own latents
}


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    state = {}
    for case, opts in CASES.items():
        torch.manual_seed(0)  # same initial weights on every rank
        name = case if case in QUANTIZERS else case.split("-")[0]
        q = build_quantizer(name, 32, 4, **opts)
        trainable = [p for p in q.parameters() if p.requires_grad]
        model = DDP(q, find_unused_parameters=name.startswith("sf-")) if trainable else q
        opt = torch.optim.SGD(trainable, lr=0.5) if trainable else None
        torch.manual_seed(100 + rank)  # different data and noise per rank
        replaced = 0
        for step in range(23):
            z = (torch.randn(2, 4, 4, 4) * (1 + rank) + step * 0.1).requires_grad_()  # like an encoder output
            out = model(z)
            replaced += out.stats["replaced"]
            if opt:
                opt.zero_grad()
                (out.quantized.square().mean() + out.loss).backward()
                opt.step()
        state[case] = {k: v.clone() for k, v in q.state_dict().items() if not k.endswith("reservoir")}
        state[case]["replaced"] = torch.tensor(replaced)
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
