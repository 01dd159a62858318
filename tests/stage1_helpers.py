"""Small stage-1 configs for tests: 16x16 shapes, a two-level encoder, a few steps."""
from stage1_tokenizer.config import load_config
from stage1_tokenizer.tokenizer_config import TokenizerConfig

SMALL = ["model.resolution=16", "model.block_out_channels=[16, 16]", "model.latent_channels=8",
         "model.vq_embed_dim=8", "model.norm_num_groups=4", "quantizer.num_codes=32", "data.num_images=256",
         "train.batch_size=16", "train.log_every=1", "train.sample_every=1000", "train.lr=2e-3"]


def small_config(*overrides: str) -> TokenizerConfig:
    return load_config(TokenizerConfig, "tiny", SMALL + list(overrides))
