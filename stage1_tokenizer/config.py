"""The stage-1 config: model, quantizer, losses, schedules, data and training, with paper defaults."""
from __future__ import annotations

from dataclasses import dataclass, field

from common.config_loader import load_config, presets
from common.loop import LoopConfig


@dataclass
class ModelConfig:
    """A diffusers ``VQModel``-shaped encoder/decoder; the quantizer sits between quant_conv and post_quant_conv."""

    in_channels: int = 3
    resolution: int = 32
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    latent_channels: int = 16
    vq_embed_dim: int = 16
    norm_num_groups: int = 8
    act_fn: str = "silu"
    mid_block_add_attention: bool = False


@dataclass
class QuantizerConfig:
    name: str = "vq"
    num_codes: int = 256
    options: dict = field(default_factory=dict)  # any keyword of build_quantizer for this variant


@dataclass
class LossConfig:
    mse_weight: float = 1.0
    l1_weight: float = 0.0  # L1 reconstruction (the released VQGAN recipe uses L1 + LPIPS)
    lpips_weight: float = 0.0  # LPIPS (VGG) perceptual loss
    lpips_images: int | None = None  # LPIPS on the first n images of each shuffled batch (~n/B of its cost); None: all
    quantizer_weight: float = 1.0
    disc_weight: float = 0.0  # PatchGAN hinge loss weight; 0 disables the discriminator
    disc_start: int = 0  # step at which the adversarial loss switches on
    disc_layers: int = 3
    disc_channels: int = 64
    disc_lr: float | None = None  # defaults to train.lr
    disc_betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # Adam betas of the discriminator


@dataclass
class ScheduleConfig:
    steps_per_epoch: int | None = None  # None: one pass over the data
    tau0: float = 1.0  # NS-VQ bandwidth at epoch 0, decayed per epoch by the quantizer's tau_decay
    tau_per_step: bool = False  # decay continuously per step instead of per epoch
    lr_decay_per_epoch: float = 1.0  # ExponentialLR: lr times this once per epoch (Beyond Stationarity: 0.995)
    # lr linearly to 0 over the run's last steps (warmup-stable-decay, Hagele et al. 2024): the final weights are an
    # annealed point instead of one noisy Adam step; 0: no cool-down (the papers' constant or exponential lr)
    cooldown_steps: int = 0
    gumbel_epochs: int | None = None  # temperature anneal length; None: the whole run
    replacement_phases: list[list[int]] = field(default_factory=list)  # [[until_step, every], ...]; negative until: from the end
    freeze_encoder_at: int | None = None  # NSVQ 2026 stage 2: encoder + quant_conv frozen from this step
    unfreeze_encoder_at: int | None = None
    probe_size: int = 16  # images in the fixed drift probe batch
    drift_every: int = 10

    def __post_init__(self):
        if self.cooldown_steps < 0:
            raise ValueError(f"schedule.cooldown_steps must be >= 0 (0: no cool-down), got {self.cooldown_steps}")


@dataclass
class DataConfig:
    source: str = "shapes"  # mnist | shapes | a folder of images | hf:<imagefolder dir>
    num_images: int | None = None  # cap on training images
    holdout: float = 0.05  # held-out fraction for folders without a split
    random_resized_crop: bool = False  # train on RandomResizedCrop(resolution) instead of resize + centre crop
    num_workers: int = 0


@dataclass
class TrainConfig(LoopConfig):
    """The tokenizer's optimisation: Adam at a constant lr unless ``schedule`` decays it."""


@dataclass
class TokenizerConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_tokenizer_config(preset: str, overrides: list[str] | None = None) -> TokenizerConfig:
    """``stage1_tokenizer/presets/tokenizer/<preset>.yaml`` (or a YAML path) + ``key=value`` overrides."""
    return load_config(TokenizerConfig, preset, overrides, presets(__package__, "tokenizer"))
