"""Class labels for the conditional priors: dropped to the null class in training, so one model also learns p(x)."""
from __future__ import annotations

import torch


def drop_labels(labels: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each label replaced by -1, the null class, with probability ``p`` (LlamaGen's class dropout, per example)."""
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, -1), labels)


def unet_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels for ``UNet2DModel(num_class_embeds = n + 1)``: the null class -1 becomes the last embedding, ``n``."""
    return torch.where(labels < 0, torch.full_like(labels, num_classes), labels)
