"""Stage-2 configs: the GPT prior (DiVeQ Sec. A.2, Tables 4-5) and the latent diffusion UNet, with paper defaults.

Presets live in ``stage2_prior/presets/gpt/`` and ``presets/ldm/``; ``load_prior_config(kind, preset, overrides)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from common.config_loader import load_config, presets
from common.loop import LoopConfig

KINDS = ("gpt", "ldm")


@dataclass
class GPTConfig:
    """``GPT2LMHeadModel`` size (Table 4, CelebA-HQ row) and the ``p_keep`` corruption schedule."""

    n_layer: int = 28
    n_head: int = 16
    n_embd: int = 1024
    dropout: float = 0.1  # Table 4; the release uses 0
    tie_head: bool = True  # output head shares the token embedding; the release unties it (false)
    p_keep_start: float = 0.5  # keep probability at step 0 ...
    p_keep_end: float = 0.95  # ... rising on a cosine to this at the last step
    class_conditional: bool = False  # a class token replaces the start token (labelled data only)
    label_dropout: float = 0.1  # LlamaGen's class_dropout_prob: the null class (the start token) learns p(x) for guidance


PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class LDMConfig:
    """``UNet2DModel`` on the quantised latents; DDPM training, DDIM sampling (LDM's linear-in-sqrt betas)."""

    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 256])
    layers_per_block: int = 2
    attention_levels: list[int] = field(default_factory=lambda: [1, 2])  # resolutions (by index) with attention
    norm_num_groups: int = 32
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    ema_decay: float = 0.9999
    num_inference_steps: int = 50  # DDIM steps for samples
    eta: float = 0.0
    prediction_type: str = "epsilon"  # what the UNet predicts: epsilon (LDM) | v_prediction (Salimans & Ho 2022)
    center_latents: bool = False  # subtract the cache's per-channel mean before 1/std (docs/methods.md: scale only)
    class_conditional: bool = False  # a class embedding (n + 1 rows, the last null) added to the time embedding
    label_dropout: float = 0.1  # labels dropped to the null class, for classifier-free guidance

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"ldm.prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                             f"got {self.prediction_type!r}")


@dataclass
class SampleConfig:
    """Sampling settings stored with the prior; ``top_k`` None picks DiVeQ Table 5's value for K."""

    top_k: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus after top-k (LlamaGen's order); 1: off
    guidance_scale: float = 1.0  # classifier-free guidance of a class-conditional prior; 1: none
    cfg_interval: int = -1  # GPT: guide only the first m + 2 codes (LlamaGen); -1: every code
    num_samples: int = 16  # images in each sample grid during training; 0: none
    seed: int = 0


@dataclass
class PriorTrainConfig(LoopConfig):
    """AdamW (0.9, 0.95), weight decay 0.01, lr 4.5e-5, 10k warm-up steps then cosine to 1% (DiVeQ Sec. A.2)."""

    batch_size: int = 32
    lr: float = 4.5e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.01
    warmup_steps: int = 10_000
    min_lr_ratio: float = 0.01
    max_steps: int | None = 100_000
    sample_every: int = 1000
    checkpoint_every: int = 1000
    val_fraction: float = 0.05  # of the code cache held out for validation (0: none)
    val_max_examples: int = 1000  # cap on the held-out examples, which bounds the cost of each validation
    val_every: int = 500  # steps between validations (GPT bits per token, LDM denoising loss), and at the end

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"train.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_every < 1 or self.val_max_examples < 0:
            raise ValueError("train.val_every must be >= 1 and train.val_max_examples >= 0")


@dataclass
class PriorConfig:
    kind: str = "gpt"
    tokenizer: str = ""  # the stage-1 run directory whose frozen codes the prior models
    num_images: int | None = None  # training images of the tokenizer's source to encode; None: those it trained on
    gpt: GPTConfig = field(default_factory=GPTConfig)
    ldm: LDMConfig = field(default_factory=LDMConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: PriorTrainConfig = field(default_factory=PriorTrainConfig)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown prior kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if not 0 < self.gpt.p_keep_start <= self.gpt.p_keep_end <= 1:
            raise ValueError("need 0 < gpt.p_keep_start <= gpt.p_keep_end <= 1")
        if not 0 <= self.gpt.label_dropout < 1 or not 0 <= self.ldm.label_dropout < 1 or not 0 < self.sample.top_p <= 1:
            raise ValueError("need 0 <= gpt.label_dropout < 1, 0 <= ldm.label_dropout < 1 and 0 < sample.top_p <= 1")


def load_prior_config(kind: str, preset: str, overrides: list[str] | None = None) -> PriorConfig:
    """``stage2_prior/presets/<kind>/<preset>.yaml`` (or a YAML path) + ``key=value`` overrides."""
    if kind not in KINDS:
        raise ValueError(f"unknown prior kind {kind!r}; choose one of {', '.join(KINDS)}")
    return replace(load_config(PriorConfig, preset, overrides, presets(__package__, kind)), kind=kind)


def default_top_k(num_codes: int) -> int:
    """DiVeQ Table 5: K=256 -> 75, 512 -> 150, >=1024 -> 300 (smaller K: the same ~30% of the codebook)."""
    if num_codes >= 1024:
        return 300
    if num_codes >= 512:
        return 150
    if num_codes >= 256:
        return 75
    return max(1, round(0.3 * num_codes))
