"""``lfq``: lookup-free quantization (MAGVIT-v2, Yu et al. 2023; as released in Open-MAGVIT2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import straight_through
from .entropy import binary_entropy, bit_table, group_batch_entropy
from .implicit import ImplicitQuantizer, code_bits


class LFQ(ImplicitQuantizer):
    """Sign of each of d = log2 K coordinates (straight-through), with an entropy loss over all 2^d codes.

    ``q = sign(x)`` in ``{-1, 1}^d``; token ``sum_j [q_j > 0] 2^j`` (little-endian, Open-MAGVIT2); loss
    ``entropy_weight (H_s - H_b) + beta ||x - sg(q)||^2``, the entropies of ``softmax(2 x.c / T)``."""

    def __init__(self, num_codes: int, dim: int, *, entropy_weight: float = 0.1, temperature: float = 0.01,
                 entropy_group: int | None = None, **options):
        d = code_bits(num_codes, "lfq")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.entropy_weight, self.temperature = float(entropy_weight), float(temperature)
        self.entropy_group = d if entropy_group is None else int(entropy_group)  # released: the exact joint entropy
        if self.entropy_group < 1 or d % self.entropy_group:
            raise ValueError(f"entropy_group must divide the {d} bits; got {entropy_group}")
        super().__init__(num_codes, dim, d, **options)  # Open-MAGVIT2's commitment weight 0.25 is beta

    def code_table(self) -> torch.Tensor:
        return 2 * bit_table(self.code_dim) - 1

    def tokens(self, x):
        return ((x > 0).long() << torch.arange(self.code_dim, device=x.device)).sum(-1)

    def entropies(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(H_s, H_b) of ``p_i = softmax(2 x_i.C^T / T)``: bit ``j`` has logit ``4 x_ij / T``, so the per-sample
        entropy is a sum of binary entropies and the batch distribution a product of two halves (``entropy.py``)."""
        a = 4 * x / self.temperature
        h_sample = binary_entropy(a).sum(1).mean()
        h_batch = group_batch_entropy(a, self.entropy_group, eps=1e-5)
        return h_sample, h_batch

    def _train_step(self, z):
        x = self.project_in(z)
        q = torch.where(x > 0, 1.0, -1.0)
        h_sample, h_batch = self.entropies(x)
        loss = self.entropy_weight * (h_sample - h_batch) + self.beta * F.mse_loss(x, q)
        bit_mean = (q > 0).float().mean(0)
        self.last_stats = {"entropy_sample": h_sample.detach(), "entropy_batch": h_batch.detach(),
                      "bit_mean_min": bit_mean.min(), "bit_mean_max": bit_mean.max()}
        return self.project_out(straight_through(x, q)), self.tokens(x), loss
