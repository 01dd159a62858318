"""Step- and epoch-driven schedules applied to the quantizer and model during stage-1 training."""
from __future__ import annotations

from torch import nn

from .quantizers import ResidualVQ
from .quantizers.gumbel import GumbelVQ
from .quantizers.ns_vq import NSVQ


def base_quantizers(q: nn.Module) -> list[nn.Module]:
    """The quantizers that hold codebooks: the stages of an rvq, else the quantizer itself."""
    return list(q.stages) if isinstance(q, ResidualVQ) else [q]


def replacement_cadence(step: int, total_steps: int, phases: list[list[int]]) -> tuple[int | None, int | None]:
    """(every, until) at ``step`` from ``[[until, every], ...]``; a negative ``until`` counts from the end.

    DiVeQ's VQ-VAE cadence is ``[[2000, 100], [-1000, 500]]``: every 100 steps up to 2000, then
    every 500 until 1000 steps before the end. No phases: the quantizer's own defaults.
    """
    if not phases:
        return None, None
    ends = [until if until >= 0 else total_steps + until for until, _ in phases]
    for end, (_, every) in zip(ends, phases):
        if step < end:
            return every, ends[-1]
    return phases[-1][1], ends[-1]


def apply_schedules(q: nn.Module, step: int, total_steps: int, steps_per_epoch: int, sched) -> dict:
    """Set bandwidth, temperature and replacement cadence for this step; returns what was set, for logging."""
    epoch = step / steps_per_epoch if sched.tau_per_step else step // steps_per_epoch
    logged = {}
    every, until = replacement_cadence(step, total_steps, sched.replacement_phases)
    for base in base_quantizers(q):
        base.maintenance.total_steps = total_steps
        base.set_step(step)
        if isinstance(base, NSVQ):
            base.set_epoch(epoch, sched.tau0)
            logged["tau"] = base.tau
        if isinstance(base, GumbelVQ):
            base.set_epoch(step // steps_per_epoch, sched.gumbel_epochs or max(1, total_steps // steps_per_epoch))
            logged["temperature"] = base.temperature
        if every is not None and base.maintenance.policy != "none":
            base.maintenance.every, base.maintenance.until = every, until
    return logged


def encoder_frozen(step: int, sched) -> bool:
    """NSVQ 2026 stage 2: encoder and quant_conv frozen in [freeze_encoder_at, unfreeze_encoder_at)."""
    start, stop = sched.freeze_encoder_at, sched.unfreeze_encoder_at
    return start is not None and step >= start and (stop is None or step < stop)
