"""``rvq``: residual VQ over any base variant (DiVeQ Sec. C.7): stage l quantises ``z - sum_{j<l} q_j``."""
from __future__ import annotations

import torch
from torch import nn

from .base import QuantizerOutput


class ResidualVQ(nn.Module):
    """``L`` quantizers of one base variant; output ``sum_l q_l``, indices ``(B, L, H, W)``, losses summed.

    ``effective_codebook()`` is ``(L, K, D)``: one codebook per depth.
    """

    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        if not stages:
            raise ValueError("rvq needs num_quantizers >= 1")
        self.stages = nn.ModuleList(stages)
        self.num_codes, self.dim = stages[0].num_codes, stages[0].dim

    @property
    def num_quantizers(self) -> int:
        return len(self.stages)

    def effective_codebook(self) -> torch.Tensor:
        return torch.stack([s.effective_codebook() for s in self.stages])

    @torch.compiler.disable  # as every quantizer: eager under train.compile
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        residual, total, loss, indices, stats = z, None, z.new_zeros(()), [], {}
        for level, stage in enumerate(self.stages):
            out = stage(residual)
            total = out.quantized if total is None else total + out.quantized
            residual = residual - out.quantized.detach()  # r_{l+1} = z - sum_{j<=l} q_j
            loss = loss + out.loss
            indices.append(out.indices)
            stats.update({f"level{level}/{k}": v for k, v in out.stats.items()})
        for key in ("perplexity", "usage"):
            stats[key] = sum(stats[f"level{i}/{key}"] for i in range(len(self.stages))) / len(self.stages)
        stats["replaced"] = sum(stats[f"level{i}/replaced"] for i in range(len(self.stages)))
        return QuantizerOutput(total, torch.stack(indices, dim=1), loss, stats)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Latents (B, D, H, W) of indices (B, L, H, W): the sum of each depth's lookup."""
        if indices.dim() != 4 or indices.shape[1] != len(self.stages):
            raise ValueError(f"rvq lookup expects indices of shape (B, {len(self.stages)}, H, W); got {tuple(indices.shape)}")
        total = None
        for level, stage in enumerate(self.stages):
            q = stage.lookup(indices[:, level])
            total = q if total is None else total + q
        return total
