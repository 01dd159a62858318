"""Codebook maintenance shared by every variant: k-means init and dead-code replacement.

Policies (docs/methods.md, "Codebook maintenance"): ``importance`` (DiVeQ Sec. B.1), ``random-used``
(NSVQ 2022), ``reservoir`` (Beyond Stationarity code / NSVQ 2026). Usage counters are
all-reduced, so every rank decides the same dead set; the new codes are drawn on every rank and
rank 0's quantizer state is then broadcast, so replicas hold one codebook bit for bit.
"""
from __future__ import annotations

import torch
from torch import nn

from .distributed import all_gather_rows, all_reduce_sum, broadcast_
from .search import nearest_code
from .stats import code_counts

POLICIES = ("none", "importance", "random-used", "reservoir")
DEFAULT_EVERY = {"importance": 100, "random-used": 1000, "reservoir": 1000}
DEFAULT_NO_REPLACE_LAST = {"random-used": 2000}  # NSVQ 2022, as released: the last 2000 steps keep their codes


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Lloyd's k-means on rows of ``x``; centres start at random rows, empty clusters keep their centre."""
    start = torch.randint(x.shape[0], (k,), generator=generator, device="cpu").to(x.device)
    centres = x[start].clone()
    for _ in range(iters):
        idx, _ = nearest_code(x, centres)
        counts = code_counts(idx, k, x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, idx, x)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return centres


class CodebookMaintenance(nn.Module):
    """Counts code usage per window of steps and replaces dead codes when a window closes.

    Replacement runs at the start of the next training forward, before the codebook enters the
    graph, so the in-place write never touches a tensor autograd has saved. The counters that steer
    control flow live twice: as buffers (checkpointed) and as Python mirrors (read each step without
    a host sync on GPUs); loading a state dict refreshes the mirrors.
    """

    MIRRORED = ("step", "initialized", "due", "replaced_total", "reservoir_fill", "reservoir_pos")

    def __init__(self, num_codes: int, code_dim: int, policy: str, every: int | None, until: int | None,
                 dead_threshold: float, noise: float, reservoir_size: int, kmeans_init: bool, kmeans_iters: int,
                 no_replace_last: int | None = None):
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"unknown replacement {policy!r}; valid: {', '.join(POLICIES)}")
        self.policy = policy
        if every is not None and every < 1:
            raise ValueError(f"replace_every must be >= 1, got {every}")
        self.every = every if every is not None else DEFAULT_EVERY.get(policy, 0)
        self.until = until
        self.no_replace_last = DEFAULT_NO_REPLACE_LAST.get(policy, 0) if no_replace_last is None else no_replace_last
        self.total_steps: int | None = None  # the run's length, set by the trainer's schedules
        self.dead_threshold = dead_threshold
        self.noise = noise
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.num_codes = num_codes
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("window_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps_selected", torch.zeros(num_codes))
        self.register_buffer("due", torch.zeros((), dtype=torch.bool))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.register_buffer("replaced_total", torch.zeros((), dtype=torch.long))
        self.last_replaced = 0
        if policy == "reservoir":
            self.register_buffer("reservoir", torch.zeros(reservoir_size, code_dim))
            self.register_buffer("reservoir_fill", torch.zeros((), dtype=torch.long))
            self.register_buffer("reservoir_pos", torch.zeros((), dtype=torch.long))
        self._refresh_mirrors()

    def _refresh_mirrors(self) -> None:
        """Python copies of the control-flow buffers (one host read, at build and load time only)."""
        self.mirror = {name: getattr(self, name).item() for name in self.MIRRORED if hasattr(self, name)}

    def _set(self, name: str, value) -> None:
        """Write a mirrored counter: the Python copy and its buffer (``fill_`` of a host value: no sync)."""
        self.mirror[name] = value
        getattr(self, name).fill_(value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh_mirrors()

    def needs_latents(self) -> bool:
        """Whether this step uses the latents themselves (k-means init pending, or a reservoir)."""
        return self.policy == "reservoir" or not self.mirror["initialized"]

    @torch.no_grad()
    def before_step(self, quantizer, z_code: torch.Tensor | None) -> None:
        """k-means init on the first training batch; pending replacement."""
        self.last_replaced = 0
        if not self.mirror["initialized"]:
            x = all_gather_rows(z_code.detach().float())
            quantizer._write_codes(torch.arange(self.num_codes, device=x.device), kmeans(x, self.num_codes, self.kmeans_iters))
            self._broadcast_state(quantizer)
            self._set("initialized", True)
        if self.mirror["due"]:
            self._replace(quantizer)
            self._set("due", False)

    @torch.no_grad()
    def after_step(self, indices: torch.Tensor, z_code: torch.Tensor | None) -> None:
        """Count which codes this step selected (summed over ranks) and schedule replacement."""
        self._set("step", self.mirror["step"] + 1)
        if self.policy == "none":
            return
        hits = all_reduce_sum(code_counts(indices, self.num_codes, torch.float32))
        self.steps_selected += (hits > 0).float()
        self.window_steps += 1
        if self.policy == "reservoir" and z_code is not None:
            self._push_reservoir(z_code.detach())
        if self.mirror["step"] % self.every == 0:
            if self.replacement_allowed(self.mirror["step"]):
                self._set("due", True)
            else:
                self._reset_window()

    def replacement_allowed(self, step: int) -> bool:
        """Whether a window closing at ``step`` may replace: before ``until``, and not in the run's last
        ``no_replace_last`` steps (the last replacement is at ``total_steps - no_replace_last``)."""
        if self.until is not None and step >= self.until:
            return False
        return self.total_steps is None or step <= self.total_steps - self.no_replace_last

    def _push_reservoir(self, x: torch.Tensor) -> None:
        size = self.reservoir.shape[0]
        if x.shape[0] > size:
            x = x[torch.randperm(x.shape[0], device=x.device)[:size]]
        pos = self.mirror["reservoir_pos"]
        slots = (torch.arange(x.shape[0], device=x.device) + pos) % size
        self.reservoir[slots] = x.to(self.reservoir.dtype)
        self._set("reservoir_pos", (pos + x.shape[0]) % size)
        self._set("reservoir_fill", min(size, self.mirror["reservoir_fill"] + x.shape[0]))

    def dead_codes(self) -> torch.Tensor:
        """Boolean mask of codes dead in the current window: selected in fewer than ``dead_threshold`` of its steps
        (importance, random-used: 1%, i.e. fewer than 10 of 1000) or never (reservoir)."""
        u = self.steps_selected / self.window_steps.clamp_min(1)
        threshold = 0.0 if self.policy == "reservoir" else self.dead_threshold
        return (u < threshold) | (u == 0)

    def _replace(self, quantizer) -> None:
        dead = self.dead_codes()
        live = ~dead
        n_dead = int(dead.sum())
        if n_dead and live.any():
            dst = dead.nonzero().squeeze(1)
            if self.policy == "reservoir":
                fill = self.mirror["reservoir_fill"]
                if fill:
                    pick = torch.randint(fill, (n_dead,), device=dst.device)
                    quantizer._write_codes(dst, self.reservoir[pick])
                else:
                    n_dead = 0
            else:
                live_idx = live.nonzero().squeeze(1)
                if self.policy == "importance":  # drawn in proportion to usage
                    src = live_idx[torch.multinomial(self.steps_selected[live_idx], n_dead, replacement=True)]
                else:  # random-used: shuffled used codes
                    src = live_idx[torch.randperm(live_idx.numel(), device=dst.device)].repeat(n_dead // live_idx.numel() + 1)[:n_dead]
                quantizer._copy_codes(dst, src, self.noise)
            self._broadcast_state(quantizer)
            self.last_replaced = n_dead
            self._set("replaced_total", self.mirror["replaced_total"] + n_dead)
        self._reset_window()

    def _reset_window(self) -> None:
        self.steps_selected.zero_()
        self.window_steps.zero_()

    @staticmethod
    def _broadcast_state(quantizer) -> None:
        for t in list(quantizer.parameters()) + list(quantizer.buffers()):
            broadcast_(t.data)

    def stats(self) -> dict:
        return {"replaced": self.last_replaced, "replaced_total": self.mirror["replaced_total"]}
