"""The accelerate training loop every stage shares: run directory, resume, data order, progress, checkpoints.

A stage subclasses :class:`TrainLoop` and supplies the models (``_build``), one micro-batch step
(``_step``) and its side outputs (``_after_step``, ``_write_samples``, ``_finish``).

A step never waits for the device: its logged values stay tensors until a step that logs, and the
finite check of the loss is kept on the device and read when the loop next logs, writes samples or
checkpoints (before anything is written), so a GPU runs ahead of the host between those steps.
"""
from __future__ import annotations

import abc
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config_loader import save_config, to_dict
from .runtime import (
    CheckpointManager,
    EpochSampler,
    MetricsLog,
    TrainingDiverged,
    TrainState,
    make_accelerator,
)
from .tracking import flat_config, log_images, scalars, tracker_kwargs, trackers_for

logger = logging.getLogger(__name__)
PRECISIONS = ("no", "fp16", "bf16", "auto")


@dataclass
class LoopConfig:
    """What :class:`TrainLoop` reads from ``cfg.train``: batch, steps, optimiser, precision, cadences and the seed.

    Each stage subclasses it for its own ``train`` section and sets its own defaults there.
    """

    batch_size: int = 32
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    max_steps: int | None = 500
    epochs: int | None = None  # used when max_steps is None
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16 | auto (bf16 where it runs natively, else no)
    compile: bool = False  # torch.compile the training forward (quantizers stay eager: data-dependent control flow)
    warmup_steps: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    sample_every: int = 100
    seed: int = 0
    report_to: str = "none"  # experiment tracker: tensorboard | wandb | all | none
    run_name: str | None = None  # the tracker run's name (default: the run directory's name)

    def __post_init__(self):
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"train.mixed_precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}")


def host_values(logs: dict) -> dict:
    """``logs`` with its tensor values read back as floats in one transfer per device."""
    tensors = {k: v for k, v in logs.items() if isinstance(v, torch.Tensor)}
    by_device: dict[torch.device, list[str]] = {}
    for k, v in tensors.items():
        by_device.setdefault(v.device, []).append(k)
    out = dict(logs)
    for keys in by_device.values():
        values = torch.stack([tensors[k].detach().double().reshape(()) for k in keys]).tolist()
        out.update(zip(keys, values))
    return out


class TrainLoop(abc.ABC):
    """One restartable run: ``cfg.train`` holds batch size, steps, precision, cadences and the seed."""

    desc = "train"

    def __init__(self, cfg: Any, output_dir: str | Path, resume: bool = False):
        self.cfg, self.out = cfg, Path(output_dir)
        if self.out.exists() and (self.out / "config.yaml").exists() and not resume:
            raise FileExistsError(f"{self.out} already holds a run; pass --resume to continue it or choose another --output-dir")
        t = cfg.train
        self.trackers = trackers_for(t.report_to)
        self.acc = make_accelerator(t.mixed_precision, t.grad_accum, self.trackers, self.out)
        set_seed(t.seed)
        self.state = TrainState()
        self._first_bad: torch.Tensor | None = None  # on the device: first step with a non-finite loss, or -1

    def _loader(self, dataset, num_workers: int = 0) -> DataLoader:
        """Epoch-seeded order; the loader's own generator keeps iterator creation off the global RNG, so a
        resumed run (which creates one mid-epoch) draws the same random numbers as an uninterrupted one."""
        t = self.cfg.train
        self.sampler = EpochSampler(len(dataset), t.seed)
        loader = DataLoader(dataset, batch_size=t.batch_size, sampler=self.sampler, drop_last=True,
                            num_workers=num_workers,
                            generator=torch.Generator().manual_seed(t.seed))
        if len(loader) == 0:
            raise ValueError(f"{len(dataset)} examples is fewer than one batch of {t.batch_size}")
        return loader

    def _start(self, loader) -> None:
        """After ``acc.prepare``: checkpointing, metrics, step counts, and resume or a fresh config."""
        t = self.cfg.train
        self.loader = loader
        # the compiled wrapper shares the parameters and is used by the training step only: checkpoints,
        # weights, validation and sampling see the plain module (no "_orig_mod." keys, no recompiles)
        self.train_model = torch.compile(self.model) if t.compile else self.model
        self.acc.register_for_checkpointing(self.state)
        self.ckpt = CheckpointManager(self.out / "checkpoints", t.keep_checkpoints)
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        self.batches_per_epoch = len(loader)
        if t.max_steps is not None:
            self.total_steps = t.max_steps
        elif t.epochs is not None:
            self.total_steps = t.epochs * math.ceil(self.batches_per_epoch / t.grad_accum)
        else:
            raise ValueError("set train.max_steps or train.epochs")

    def _resume_or_begin(self, resume: bool) -> None:
        latest = self._load_latest_good() if resume else None
        if latest is None:
            if resume:
                logger.warning("no complete checkpoint in %s; starting from scratch", self.ckpt.root)
            if self.acc.is_main_process:
                save_config(self.cfg, self.out / "config.yaml")
        else:
            self.acc.print(f"resumed from {latest} at step {self.state.step}")
        if self.acc.is_main_process:  # no lines past the restored step; a restart from scratch keeps none
            self.metrics.truncate_after(self.state.step)
        if self.trackers:
            name = self.cfg.train.run_name or self.out.resolve().name
            self.acc.init_trackers(name, config=flat_config(to_dict(self.cfg)),
                                   init_kwargs=tracker_kwargs(self.trackers, name, self.out, self.state.step))

    def _load_latest_good(self) -> Path | None:
        """Load the newest checkpoint that loads: one that fails (truncated or corrupt files) is named in one line
        and the one before it tried (the next save of that step replaces the bad one); if none loads, the first
        failure is raised, so a broken resume never silently becomes a fresh start."""
        first_error = None
        for path in reversed(self.ckpt.complete()):
            try:
                self.acc.load_state(str(path))
                return path
            except Exception as e:  # safetensors, torch.load and zip raise many types for damaged files
                first_error = first_error or e
                logger.warning("checkpoint %s is unreadable (%s: %s); trying the one before it", path,
                               type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        if first_error is not None:
            raise RuntimeError(f"no checkpoint in {self.ckpt.root} loads (the newest failed with "
                               f"{type(first_error).__name__}: {first_error})") from first_error
        return None

    def _watch_finite(self, loss: torch.Tensor, step: int) -> None:
        """Note on the device whether this step's loss is finite; :meth:`_raise_if_diverged` reads it."""
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach())
        self._first_bad = torch.where(bad & (self._first_bad < 0), step, self._first_bad)

    def _raise_if_diverged(self) -> None:
        """Stop every rank if any rank saw a non-finite loss, naming its step and the last good checkpoint
        (one host read; nothing is written after the bad step)."""
        if self._first_bad is None:
            return
        bad = [s for s in self.acc.gather(self._first_bad.reshape(1)).tolist() if s >= 0]
        if bad:
            latest = self.ckpt.latest()
            raise TrainingDiverged(f"non-finite loss at step {min(bad)}; stopping. Last good checkpoint: "
                                   f"{latest or 'none yet'} (resume with --resume)")

    @property
    def unwrapped(self):
        """The model without its DDP / accelerate wrapper."""
        return self.acc.unwrap_model(self.model)

    def _optimise(self, loss: torch.Tensor, step: int) -> None:
        """Finite watch, backward, clip to norm 1, optimiser and lr-schedule step."""
        self._watch_finite(loss, step)
        self.acc.backward(loss)
        if self.acc.sync_gradients:
            self.acc.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def _epoch_iter(self, step: int):
        """Batches from the data position of ``step`` on, epoch after epoch."""
        consumed = step * self.cfg.train.grad_accum
        epoch, skip = divmod(consumed, self.batches_per_epoch)
        while True:
            loader = self.acc.skip_first_batches(self.loader, skip) if skip else self.loader
            loader.set_epoch(epoch)  # accelerate's loaders own the epoch counter that reaches the sampler
            self.sampler.set_epoch(epoch)
            for batch in loader:
                yield batch
            epoch, skip = epoch + 1, 0

    # --- stage hooks -----------------------------------------------------------------------
    def _before_step(self, step: int) -> dict:
        """Schedules applied before the step; returned values are logged."""
        return {}

    @abc.abstractmethod
    def _step(self, batch, step: int) -> dict:
        """One micro-batch: forward, backward (``_optimise``); returns the values to log (0-dim tensors stay
        on the device; the loop reads them only on a step that logs)."""

    def _after_step(self, step: int, logs: dict) -> None:
        """Extra measurements after the optimiser step (added to ``logs``)."""

    def _log_now(self, step: int, logs: dict) -> bool:
        return step % self.cfg.train.log_every == 0

    def _postfix(self, logs: dict) -> dict:
        return {"loss": f"{logs['loss']:.4f}"}

    def _write_samples(self, step: int) -> dict[str, Path]:
        """Sample grids and plots (main process only); returns the grids to send to the trackers by name."""
        return {}

    @abc.abstractmethod
    def _finish(self, step: int, seconds: float) -> Path:
        """Write the final weights and run.json; return the weights folder."""

    # --- the loop ----------------------------------------------------------------------------
    def train(self, max_steps: int | None = None) -> Path:
        try:
            return self._train(max_steps)
        finally:  # close the trackers' writers, also when a run stops early; not end_training(), which
            for tracker in self.acc.trackers:  # would also destroy the process group a sweep keeps using
                tracker.finish()

    def _train(self, max_steps: int | None) -> Path:
        total = self.total_steps if max_steps is None else min(max_steps, self.total_steps)
        t = self.cfg.train
        step = self.state.step
        bar = tqdm(total=total, initial=step, desc=self.desc, disable=not self.acc.is_local_main_process)
        start = time.time()
        batches = self._epoch_iter(step)
        while step < total:
            scheduled = self._before_step(step)
            logs = {}
            for _ in range(t.grad_accum):
                logs = self._step(next(batches), step)
            step += 1
            self.state.step = step
            self._after_step(step, logs)
            log = self._log_now(step, logs) or step == total
            samples = step % t.sample_every == 0 or step == total
            save = step % t.checkpoint_every == 0 or step == total
            if log or samples or save:
                self._raise_if_diverged()
            if log:
                logs = host_values(logs)
                bar.set_postfix(self._postfix(logs))
                if self.acc.is_main_process:
                    record = {"step": step, **scheduled, **logs}
                    self.metrics.write(record)
                    self.acc.log(scalars({k: v for k, v in record.items() if k != "step"}), step=step)
            bar.update(1)
            if self.acc.is_main_process and samples:
                log_images(self.acc.trackers, self._write_samples(step), step)
            if save:
                self.ckpt.save(self.acc, step)
        bar.close()
        return self._finish(step, time.time() - start)
