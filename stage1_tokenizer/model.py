"""The VQ tokenizer: diffusers' VQModel layout with any of our quantizers in the ``quantize`` slot.

Sub-module names match ``diffusers.VQModel`` (encoder, quant_conv, quantize, post_quant_conv,
decoder) so export can copy weights into a stock VQModel with the effective codebook.
"""
from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import Decoder, DecoderOutput, Encoder
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .config import ModelConfig, QuantizerConfig
from .lookup_tokenizer import uncentre
from .quantizers import QuantizerOutput, ResidualVQ, build_quantizer
from .quantizers.search import nearest_code
from .schedules import base_quantizers


class VQTokenizer(ModelMixin, ConfigMixin):
    """Encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder; ``save_pretrained`` round-trips."""

    @register_to_config
    def __init__(self, in_channels: int = 3, resolution: int = 32, block_out_channels: tuple = (32, 64),
                 layers_per_block: int = 1, latent_channels: int = 16, vq_embed_dim: int = 16,
                 norm_num_groups: int = 8, act_fn: str = "silu", mid_block_add_attention: bool = False,
                 quantizer: str = "vq", num_codes: int = 256, quantizer_options: dict | None = None,
                 scaling_factor: float = 1.0, latents_mean: list[float] | None = None):
        super().__init__()
        depth = len(block_out_channels)
        self.encoder = Encoder(in_channels, latent_channels, ("DownEncoderBlock2D",) * depth, tuple(block_out_channels),
                               layers_per_block, norm_num_groups, act_fn, double_z=False,
                               mid_block_add_attention=mid_block_add_attention)
        self.quant_conv = nn.Conv2d(latent_channels, vq_embed_dim, 1)
        self.quantize = build_quantizer(quantizer, num_codes, vq_embed_dim, **(quantizer_options or {}))
        self.post_quant_conv = nn.Conv2d(vq_embed_dim, latent_channels, 1)
        self.decoder = Decoder(latent_channels, in_channels, ("UpDecoderBlock2D",) * depth, tuple(block_out_channels),
                               layers_per_block, norm_num_groups, act_fn, mid_block_add_attention=mid_block_add_attention)

    @classmethod
    def from_configs(cls, model: ModelConfig, quantizer: QuantizerConfig) -> "VQTokenizer":
        return cls(in_channels=model.in_channels, resolution=model.resolution,
                   block_out_channels=tuple(model.block_out_channels), layers_per_block=model.layers_per_block,
                   latent_channels=model.latent_channels, vq_embed_dim=model.vq_embed_dim,
                   norm_num_groups=model.norm_num_groups, act_fn=model.act_fn,
                   mid_block_add_attention=model.mid_block_add_attention, quantizer=quantizer.name,
                   num_codes=quantizer.num_codes, quantizer_options=dict(quantizer.options))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> pre-quantisation latents (B, vq_embed_dim, h, w)."""
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        return self.quant_conv(self.encoder(x))

    def decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quantized))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Token indices -> images, through the frozen codebook lookup."""
        return self.decode_latents(self.quantize.lookup(indices))

    def set_hard_inference(self, hard: bool = True) -> None:
        """SF-DiVeQ's eval output is its continuous projection unless hard; tokens (and the priors) need hard."""
        for q in base_quantizers(self.quantize):
            if hasattr(q, "hard_inference"):
                q.hard_inference = hard

    def quantizer_state(self) -> list[dict]:
        """Each codebook's training state outside parameters and buffers (SF-DiVeQ's warm-up latents), for checkpoints."""
        return [q.extra_state() for q in base_quantizers(self.quantize)]

    def load_quantizer_state(self, states: list[dict]) -> None:
        for q, state in zip(base_quantizers(self.quantize), states, strict=True):
            q.load_extra_state(state)

    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> token indices (B, h, w), or (B, L, h, w) for rvq; call in eval mode."""
        return self.quantize(self.encode(x)).indices

    def lookup_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """Tokens -> latents in the quantizer's ``lookup_space`` (rvq: the sum over depths): what the LDM models."""
        if isinstance(self.quantize, ResidualVQ):
            return self.quantize.lookup(indices)
        return self.quantize.lookup_space()[0][indices].permute(0, 3, 1, 2)

    def requantize(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in ``lookup_space`` -> tokens of their nearest codes (rvq: residual, depth by depth)."""
        if isinstance(self.quantize, ResidualVQ):
            return self.quantize(latents).indices
        b, d, h, w = latents.shape
        flat = latents.permute(0, 2, 3, 1).reshape(-1, d).float()
        return nearest_code(flat, self.quantize.lookup_space()[0])[0].view(b, h, w)

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        """``VQModel.decode``'s contract: re-quantise latents through the frozen codebook, then decode.

        This lets ``diffusers.LDMPipeline`` sample with this tokenizer as its ``vqvae``; a prior trained on centred
        latents sets ``config.latents_mean``, added back here before re-quantisation.
        """
        image = self.decode_indices(self.requantize(uncentre(latents, self.config.latents_mean)))
        return DecoderOutput(sample=image) if return_dict else (image,)

    def forward(self, x: torch.Tensor, freeze_encoder: bool = False) -> tuple[torch.Tensor, QuantizerOutput]:
        """Reconstruction and the quantizer output; ``freeze_encoder`` runs the encoder without gradients."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze_encoder):
            latents = self.encode(x)
        q = self.quantize(latents)
        return self.decode_latents(q.quantized), q
