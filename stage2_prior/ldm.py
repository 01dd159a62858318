"""Latent diffusion on the quantised latents: ``UNet2DModel`` + DDPM training, DDIM sampling (Rombach et al. 2022).

Latents are scaled by the tokenizer's ``scaling_factor`` (1 / std of the code cache) to unit variance;
samples are divided by it, re-quantised through the frozen codebook and decoded, exactly as
``diffusers.LDMPipeline`` does with a ``VQModel``. With ``ldm.center_latents`` the cache's per-channel mean
is subtracted first (``scaling_factor`` then 1 / std of the centred latents) and ``config.latents_mean`` adds
it back before re-quantisation; export folds it into the stock ``VQModel``'s lookup space.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from .config import LDMConfig


def build_unet(cfg: LDMConfig, channels: int, sample_size: int, num_classes: int = 0) -> UNet2DModel:
    """A UNet over (channels, sample_size, sample_size) latents, attention at ``cfg.attention_levels``; with
    ``num_classes`` a class embedding of ``n + 1`` rows (the last the null class) added to the time embedding."""
    levels = range(len(cfg.block_out_channels))
    bad = [i for i in cfg.attention_levels if i not in levels]
    if bad:
        raise ValueError(f"ldm.attention_levels {bad} outside the {len(levels)} UNet levels")
    down = tuple("AttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels)
    up = tuple("AttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(levels))
    return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels,
                       block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                       down_block_types=down, up_block_types=up, norm_num_groups=cfg.norm_num_groups,
                       num_class_embeds=num_classes + 1 if num_classes else None)


def build_noise_scheduler(cfg: LDMConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         beta_start=cfg.beta_start, beta_end=cfg.beta_end, clip_sample=False,
                         prediction_type=cfg.prediction_type)


def sampling_scheduler(train_scheduler: DDPMScheduler) -> DDIMScheduler:
    """DDIM over the same noise schedule as training."""
    return DDIMScheduler.from_config(train_scheduler.config)


def diffusion_loss(unet: UNet2DModel, scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor | None = None,
                   t: torch.Tensor | None = None, class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """DDPM loss ``|| target - f_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t) ||^2`` with target ``eps``
    (epsilon prediction) or ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0`` (v-prediction, the scheduler's setting).
    ``noise`` and ``t`` are drawn when not given (validation passes fixed ones); ``class_labels`` for a
    class-conditional UNet."""
    noise = torch.randn_like(latents) if noise is None else noise
    if t is None:
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    target = scheduler.get_velocity(latents, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
    return F.mse_loss(unet(noisy, t, class_labels=class_labels).sample.float(), target.float())
