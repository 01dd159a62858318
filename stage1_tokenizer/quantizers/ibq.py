"""``ibq``: index backpropagation quantization (Shi et al. 2024; Open-MAGVIT2's ``IndexPropagationQuantize``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from .base import Quantizer
from .entropy import entropy


class IBQ(Quantizer):
    """A learned codebook whose straight-through one-hot passes a gradient to every code (argmax of ``z.C``).

    ``z_q = (onehot - sg(s) + s) C`` with ``s = softmax(z C^T)``; loss ``||z_q - z||^2 + ||sg(c) - z||^2 + beta ||c - sg(z)||^2 + entropy_weight (H_s - H_b)`` on
    ``softmax(z C^T / T)``."""

    unused_options = ("max_search_elements",)  # tokens by argmax, no nearest-code search

    def __init__(self, num_codes: int, dim: int, *, entropy_weight: float = 0.05, temperature: float = 0.01,
                 **options):
        super().__init__(num_codes, dim, **options)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.entropy_weight, self.temperature = float(entropy_weight), float(temperature)
        self.codebook = nn.Parameter(torch.randn(self.num_codes, self.dim))  # nn.Embedding's N(0, 1)

    def effective_codebook(self) -> torch.Tensor:
        return self.codebook

    def lookup_space(self):
        """``C' = [C, sqrt(M - ||c||^2)]``, ``M = max ||c||^2``, in-map ``z -> [z, 0]``, out-map drops the last
        coordinate: ``||[z, 0] - c'||^2 = ||z||^2 + M - 2 z.c``, so the nearest row of C' is ``argmax z.c``."""
        c = self.codebook.detach()
        sq = c.pow(2).sum(1, keepdim=True)
        table = torch.cat([c, (sq.max() - sq).clamp_min(0).sqrt()], dim=1)
        # skip_init: these weights are set below, so no draw from the global RNG (a sampling run stays reproducible)
        in_map = skip_init(nn.Linear, self.dim, self.dim + 1, device=c.device, dtype=c.dtype)
        out_map = skip_init(nn.Linear, self.dim + 1, self.dim, device=c.device, dtype=c.dtype)
        with torch.no_grad():
            eye = torch.eye(self.dim, self.dim + 1, dtype=c.dtype, device=c.device)
            in_map.weight.copy_(eye.T), out_map.weight.copy_(eye)
            in_map.bias.zero_(), out_map.bias.zero_()
        return table, in_map, out_map

    def _eval_indices(self, z):
        return (z @ self.codebook.T).argmax(1)

    def _train_step(self, z):
        logits = z @ self.codebook.T
        soft = torch.softmax(logits, dim=1)
        idx = soft.argmax(1)
        c = self.codebook[idx]
        # (onehot - sg(s) + s) C without the dense one-hot: the value C[i*]; C's gradient through the one-hot
        # (the gather) and through s, and z's through s, exactly as the released product
        spread = soft @ self.codebook.detach()
        zq = c + (spread - spread.detach())
        quant = F.mse_loss(zq, z) + F.mse_loss(z, c.detach()) + self.beta * F.mse_loss(c, z.detach())
        log_p = torch.log_softmax(logits / self.temperature, dim=1)
        p = log_p.exp()
        h_sample = -(p * log_p).sum(1).mean()
        h_batch = entropy(p.mean(0), eps=1e-5)
        self.last_stats = {"entropy_sample": h_sample.detach(), "entropy_batch": h_batch.detach()}
        return zq, idx, quant + self.entropy_weight * (h_sample - h_batch)
