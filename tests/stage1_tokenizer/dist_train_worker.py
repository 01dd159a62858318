"""Under ``torchrun --nproc_per_node 2``: a few stage-1 steps with DDP, then every rank saves its weights."""
import sys
from pathlib import Path

import torch

from stage1_tokenizer.train import TokenizerTrainer
from tests.helpers import small_config


def main(out: str) -> None:
    cfg = small_config("quantizer.name=diveq", "quantizer.options={replace_every: 3}", "train.max_steps=8",
                       "train.checkpoint_every=4")
    trainer = TokenizerTrainer(cfg, Path(out) / "run")
    trainer.train()
    state = {k: v.detach().cpu().clone() for k, v in trainer.unwrapped.state_dict().items()}
    torch.save(state, Path(out) / f"rank{trainer.acc.process_index}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
