"""``VQLookupTokenizer``: the inference-only form of a tokenizer that diffusers' ``VQModel`` cannot express.

Three variants have no stock form: ``rvq`` (several codebooks whose lookups are summed, each depth quantising
the residual of the ones before), ``gumbel`` (tokens are the argmax of learned logits) and ``fsq`` (latents
pass a nonlinear bound before they are rounded, which the export holds as each coordinate's cell edges). Export converts
their trained ``VQTokenizer`` into this model. The file is self-contained on purpose (torch and diffusers
only): export copies it into the pipeline's ``vqvae/`` folder, so ``from_pretrained(..., trust_remote_code=True)``
runs exactly this code in a Python without vqgen. It keeps ``VQModel``'s contract: ``encode``, ``decode``
(re-quantise latents, then decode) and ``config.scaling_factor``, plus ``tokenize`` and ``decode_indices``.
"""
from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import Decoder, DecoderOutput, Encoder
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

MAX_DISTANCES = 1 << 22  # distances held at once in the nearest-code search


def nearest_rows(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest ``codebook`` row (K, D) to each row of ``z`` (N, D); ties go to the lowest index."""
    z, codebook = z.float(), codebook.float()
    code_sq = codebook.pow(2).sum(1)
    rows = max(1, MAX_DISTANCES // codebook.shape[0])
    return torch.cat([torch.addmm(code_sq, z[r:r + rows], codebook.T, alpha=-2.0).argmin(1)
                      for r in range(0, z.shape[0], rows)]) if len(z) else z.new_zeros(0, dtype=torch.long)


def grid_tokens(x: torch.Tensor, edges: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Tokens of a scalar grid (FSQ): coordinate ``j``'s digit is how many of its cell edges ``edges[j]`` (padded
    with +inf) lie below ``x_j``; the index is mixed-radix, the first coordinate least significant."""
    digits = (x[:, :, None] > edges[None]).sum(-1)
    basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0)
    return (digits * basis).sum(-1)


def uncentre(latents: torch.Tensor, latents_mean: list[float] | None) -> torch.Tensor:
    """Latents (B, D, h, w) plus the per-channel mean a centred prior removed (none: unchanged)."""
    if latents_mean is None:
        return latents
    return latents + torch.tensor(latents_mean, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1)


class LookupStage(nn.Module):
    """One depth: a token is ``argmax(to_logits(z))``, the scalar-grid cell of ``in_map(z)`` (``levels`` given:
    FSQ), or the nearest ``codebook`` row to ``in_map(z)``; it decodes to ``out_map(codebook[token])``. Absent
    maps are identities."""

    def __init__(self, dim: int, num_codes: int, code_dim: int, in_map: bool, out_map: bool, logits: bool,
                 levels: list[int] | None = None):
        super().__init__()
        self.codebook = nn.Parameter(torch.zeros(num_codes, code_dim), requires_grad=False)
        self.in_map = nn.Linear(dim, code_dim) if in_map else None
        self.out_map = nn.Linear(code_dim, dim) if out_map else None
        self.to_logits = nn.Linear(dim, num_codes) if logits else None
        self.register_buffer("levels", torch.tensor(levels or [], dtype=torch.long), persistent=False)
        self.edges = nn.Parameter(torch.zeros(len(levels), max(levels) - 1), requires_grad=False) if levels else None

    def tokens(self, z: torch.Tensor) -> torch.Tensor:
        if self.to_logits is not None:
            return self.to_logits(z).argmax(1)
        x = self.in_map(z) if self.in_map is not None else z
        if self.edges is not None:
            return grid_tokens(x.float(), self.edges, self.levels)
        return nearest_rows(x, self.codebook)

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        code = self.codebook[idx]
        return self.out_map(code) if self.out_map is not None else code


class VQLookupTokenizer(ModelMixin, ConfigMixin):
    """Encoder -> quant_conv -> frozen lookup (``num_quantizers`` residual depths, or one) -> post_quant_conv -> decoder.

    Latents given to ``decode`` (what a latent diffusion prior samples) live where the trained tokenizer's lookup
    lives: the codebook's space for one depth, the summed ``vq_embed_dim`` space for residual depths.
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, sample_size: int = 32, block_out_channels: tuple = (32, 64),
                 layers_per_block: int = 1, latent_channels: int = 16, vq_embed_dim: int = 16, norm_num_groups: int = 8,
                 act_fn: str = "silu", mid_block_add_attention: bool = False, num_codes: int = 256,
                 code_dim: int = 16, num_quantizers: int = 1, residual: bool = False, in_map: bool = False,
                 out_map: bool = False, logits: bool = False, scaling_factor: float = 1.0,
                 latents_mean: list[float] | None = None, levels: list[int] | None = None):
        super().__init__()
        depth = len(block_out_channels)
        if num_quantizers > 1 and not residual:
            raise ValueError("several quantizer depths only make sense as residual depths")
        self.encoder = Encoder(in_channels, latent_channels, ("DownEncoderBlock2D",) * depth, tuple(block_out_channels),
                               layers_per_block, norm_num_groups, act_fn, double_z=False,
                               mid_block_add_attention=mid_block_add_attention)
        self.quant_conv = nn.Conv2d(latent_channels, vq_embed_dim, 1)
        self.stages = nn.ModuleList(LookupStage(vq_embed_dim, num_codes, code_dim, in_map, out_map, logits, levels)
                                    for _ in range(num_quantizers))
        self.post_quant_conv = nn.Conv2d(vq_embed_dim, latent_channels, 1)
        self.decoder = Decoder(latent_channels, in_channels, ("UpDecoderBlock2D",) * depth, tuple(block_out_channels),
                               layers_per_block, norm_num_groups, act_fn, mid_block_add_attention=mid_block_add_attention)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, C, H, W) -> pre-quantisation latents (B, vq_embed_dim, h, w)."""
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        return self.quant_conv(self.encoder(x))

    def _residual_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, L, h, w): depth l quantises what depths < l left over."""
        b, d, h, w = z.shape
        residual, out = z.permute(0, 2, 3, 1).reshape(-1, d).float(), []
        for stage in self.stages:
            idx = stage.tokens(residual)
            residual = residual - stage.lookup(idx)
            out.append(idx.view(b, h, w))
        return torch.stack(out, dim=1)

    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> tokens (B, h, w), or (B, L, h, w) for residual depths."""
        tokens = self._residual_tokens(self.encode(x))
        return tokens if self.config.residual else tokens[:, 0]

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens -> quantised latents (B, vq_embed_dim, h, w): the sum of each depth's lookup."""
        want = (len(self.stages),) if self.config.residual else ()
        if tokens.dim() != 3 + len(want) or tuple(tokens.shape[1:1 + len(want)]) != want:
            raise ValueError(f"expected tokens of shape (B, {', '.join(map(str, want + ('h', 'w')))}), "
                             f"got {tuple(tokens.shape)}")
        grids = tokens.unbind(1) if self.config.residual else (tokens,)
        total = sum(stage.lookup(g) for stage, g in zip(self.stages, grids))
        return total.permute(0, 3, 1, 2)

    def decode_indices(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens -> images in [-1, 1], through the frozen codebook lookup."""
        return self.decoder(self.post_quant_conv(self.lookup(tokens)))

    def requantize(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents of a prior -> tokens: residual depths re-quantise depth by depth, one depth by nearest code."""
        if self.config.residual:
            return self._residual_tokens(latents)
        b, d, h, w = latents.shape
        return nearest_rows(latents.permute(0, 2, 3, 1).reshape(-1, d), self.stages[0].codebook).view(b, h, w)

    def decode(self, latents: torch.Tensor, force_not_quantize: bool = False, return_dict: bool = True):
        """``VQModel.decode``'s contract: re-quantise through the frozen codebook (always), then decode; the
        per-channel ``config.latents_mean`` a centred prior removed is added back first."""
        image = self.decode_indices(self.requantize(uncentre(latents, self.config.latents_mean)))
        return DecoderOutput(sample=image) if return_dict else (image,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        """Reconstruction of ``sample``: encode, tokenize, decode."""
        image = self.decode_indices(self.tokenize(sample))
        return DecoderOutput(sample=image) if return_dict else (image,)
