"""Small stage-2 configs and a tiny trained tokenizer run for tests."""
from pathlib import Path

from stage1_tokenizer.train import train_tokenizer
from stage2_prior.config import PriorConfig, load_prior_config

from stage1_helpers import small_config

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
    base = TINY_GPT if kind == "gpt" else TINY_LDM
    return load_prior_config(kind, "tiny", [f"tokenizer={tokenizer}", *base, *overrides])
