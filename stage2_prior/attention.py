"""The priors' attention kernel by device: explicit matmul-softmax on a CPU, torch's fused SDPA elsewhere.

Both compute softmax(Q K^T / sqrt(d)) V. On a CPU, torch's fused kernel (flash attention for CPU) spends more in
its backward than the explicit form does for the priors' short sequences (64-256 tokens; the side-by-side
figures: benchmarks/results/profile.md). On an accelerator the fused kernel is the faster one.
"""
from __future__ import annotations

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from transformers import PreTrainedModel


def fit_attention(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """Switch a GPT (transformers) or a UNet (diffusers) to the attention kernel for ``device``; returns it."""
    cpu = torch.device(device).type == "cpu"
    if isinstance(model, PreTrainedModel):
        model.set_attn_implementation("eager" if cpu else "sdpa")
    elif isinstance(model, UNet2DModel):  # it has no set_attn_processor: each attention layer is set
        for layer in model.modules():
            if isinstance(layer, Attention):
                layer.set_processor(AttnProcessor() if cpu else AttnProcessor2_0())
    else:
        raise TypeError(f"no attention switch for {type(model).__name__}")
    return model
