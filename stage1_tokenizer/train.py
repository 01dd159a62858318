"""Stage-1 training: one accelerate loop for every quantizer, restartable, on one CPU or many GPUs.

    vqgen train-tokenizer --quantizer diveq --preset tiny --data mnist --output-dir runs/t
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from common.atomic import write_atomic
from common.config_loader import from_dict
from common.loop import TrainLoop

from .config import TokenizerConfig
from .data import build_dataset, skipped_files
from .losses import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
from .model import VQTokenizer
from .plots import plot_drift, plot_kernel_regime, plot_usage, save_recon_grid
from .quantizers import Quantizer
from .quantizers.stats import code_counts
from .schedules import apply_schedules, encoder_frozen


def lpips_loss_fn(device, net: str = "vgg"):
    """LPIPS on [-1, 1] images (grey repeated to RGB), with the offline weights of ``eval`` (clear error if absent)."""
    from eval.lpips_offline import load_lpips

    model = load_lpips(net, str(device))
    return lambda a, b: model(a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1))


class QuantizerState:
    """The quantizers' state outside parameters and buffers, registered with accelerate for checkpointing."""

    def __init__(self, model: VQTokenizer):
        self.model = model

    def state_dict(self) -> dict:
        return {"quantizers": self.model.quantizer_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_quantizer_state(state["quantizers"])


class TokenizerTrainer(TrainLoop):
    """Owns the models, optimisers and data of one stage-1 run; the loop itself is :class:`TrainLoop`."""

    def __init__(self, cfg: TokenizerConfig, output_dir: str | Path, resume: bool = False, data_fit: dict | None = None):
        super().__init__(cfg, output_dir, resume)
        self.data_fit = data_fit
        self.desc = f"tokenizer[{cfg.quantizer.name}]"
        t, m = cfg.train, cfg.model
        self.dataset = build_dataset(cfg.data.source, m.resolution, m.in_channels, "train", cfg.data.num_images,
                                     cfg.data.holdout, cfg.data.random_resized_crop)
        self.skipped = skipped_files(self.dataset)
        loader = self._loader(self.dataset, cfg.data.num_workers)
        self.model = VQTokenizer.from_configs(m, cfg.quantizer)
        for module in self.model.modules():  # the loop's finite watch on the loss replaces their per-step sync
            if isinstance(module, Quantizer):
                module.check_finite = False
        self.out.mkdir(parents=True, exist_ok=True)  # only once config, data and quantizer are known to be valid
        self.opt = torch.optim.Adam(self.model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        objs = [self.model, self.opt, loader, self.sched]
        self.disc = None
        if cfg.loss.disc_weight > 0:
            self.disc = PatchDiscriminator(m.in_channels, cfg.loss.disc_channels, cfg.loss.disc_layers)
            self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=cfg.loss.disc_lr or t.lr,
                                             betas=tuple(cfg.loss.disc_betas))
            objs += [self.disc, self.disc_opt]
        prepared = self.acc.prepare(*objs)
        self.model, self.opt, loader, self.sched = prepared[:4]
        if self.disc is not None:
            self.disc, self.disc_opt = prepared[4:]
        self.lpips = lpips_loss_fn(self.acc.device) if cfg.loss.lpips_weight > 0 else None
        self._start(loader)
        warmup = getattr(self.unwrapped.quantize, "warmup", 0)
        if warmup >= self.total_steps:  # it would never quantise: a tokenizer whose codes mean nothing
            raise ValueError(f"{cfg.quantizer.name}'s warm-up ({warmup} steps) lasts the whole run ({self.total_steps} "
                             f"steps); set quantizer.options.warmup below it or train longer")
        self.steps_per_epoch = cfg.schedule.steps_per_epoch or max(1, self.batches_per_epoch // t.grad_accum)
        g = torch.Generator().manual_seed(12345)  # the drift probe: fixed images, independent of the run seed
        probe_idx = torch.randperm(len(self.dataset), generator=g)[: cfg.schedule.probe_size].tolist()
        self.probe = torch.stack([self.dataset[i][0] for i in probe_idx]).to(self.acc.device)
        self.acc.register_for_checkpointing(QuantizerState(self.unwrapped))
        self._resume_or_begin(resume)
        self.model.train()

    def _count_epoch_codes(self, indices: torch.Tensor) -> None:
        """Mark the codes this batch selected (all depths of an rvq together), for ``usage_epoch``."""
        hits = self.state.extra.get("epoch_hits")
        batch = code_counts(indices.detach(), self.cfg.quantizer.num_codes, torch.float32) > 0
        self.state.extra["epoch_hits"] = batch if hits is None else hits.to(batch.device) | batch  # no host copy

    def _close_epoch(self, logs: dict) -> None:
        """``usage_epoch``: codes selected at least once over the epoch just ended, on every rank (Beyond
        Stationarity's count); logged, kept for run.json, and the count restarts."""
        hits = self.state.extra.pop("epoch_hits", None)
        if hits is None:
            return
        hits = self.acc.reduce(hits.float().to(self.acc.device), "sum") > 0
        self.state.extra["usage_epoch"] = logs["usage_epoch"] = float(hits.float().mean())

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then ``schedule.lr_decay_per_epoch`` to the power of the epoch (ExponentialLR per epoch),
        times a linear cool-down to 0 over the last ``schedule.cooldown_steps`` (the whole run when shorter: smoke
        caps)."""
        t, sched = self.cfg.train, self.cfg.schedule
        epoch = step // getattr(self, "steps_per_epoch", step + 1)  # set once the loader is known; 0 before
        total = getattr(self, "total_steps", None)  # likewise; before it, only step 0, which never cools
        cooldown = 1.0
        if sched.cooldown_steps and total:
            cooldown = min(1.0, (total - step) / min(sched.cooldown_steps, total))
        return min(1.0, (step + 1) / max(1, t.warmup_steps)) * sched.lr_decay_per_epoch ** epoch * cooldown

    # --- one optimisation step -------------------------------------------------------------
    def _losses(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
        cfg = self.cfg.loss
        recon, q = self.train_model(x, freeze_encoder=encoder_frozen(step, self.cfg.schedule))
        self._count_epoch_codes(q.indices)
        rec = F.mse_loss(recon.float(), x.float())
        logs = {"mse": rec.detach(), "q_loss": q.loss.detach(), **q.stats}  # tensors: read when the loop logs
        nll = cfg.mse_weight * rec
        if cfg.l1_weight > 0:
            l1 = F.l1_loss(recon.float(), x.float())
            nll = nll + cfg.l1_weight * l1
            logs["l1"] = l1.detach()
        if self.lpips is not None:
            n = cfg.lpips_images or len(x)  # batches are shuffled: the first n are a random subset
            p = self.lpips(recon[:n].float(), x[:n].float()).mean()
            nll = nll + cfg.lpips_weight * p
            logs["lpips"] = p.detach()
        loss = nll + cfg.quantizer_weight * q.loss
        if self.disc is not None and step >= cfg.disc_start:
            g = hinge_g_loss(self.disc(recon))
            last = self.unwrapped.decoder.conv_out.weight
            w = adaptive_weight(nll, g, last, cfg.disc_weight) if torch.is_grad_enabled() else cfg.disc_weight
            loss = loss + w * g
            logs.update(g_loss=g.detach(), d_weight=w.detach() if isinstance(w, torch.Tensor) else w)
        return loss, logs, recon

    def _step(self, batch, step: int) -> dict:
        x, _ = batch
        with self.acc.accumulate(self.model):
            loss, logs, recon = self._losses(x, step)
            self._optimise(loss, step)
        if self.disc is not None and step >= self.cfg.loss.disc_start:
            with self.acc.accumulate(self.disc):
                self.disc_opt.zero_grad(set_to_none=True)  # drop what the generator's backward left in D
                # real and fake in one forward: DDP expects one forward per backward
                real, fake = self.disc(torch.cat([x, recon.detach()])).chunk(2)
                d = hinge_d_loss(real, fake)
                self.acc.backward(d)
                self.disc_opt.step()
                self.disc_opt.zero_grad(set_to_none=True)
            logs["d_loss"] = d.detach()
        logs["loss"] = loss.detach()
        return logs

    # --- side outputs ----------------------------------------------------------------------
    @torch.no_grad()
    def _drift(self) -> float | None:
        """Mean ``||z_t - z_prev||`` per step on the fixed probe batch since the last measurement."""
        z = self.unwrapped.encode(self.probe).float()
        prev = self.state.extra.get("probe_latents")
        self.state.extra["probe_latents"] = z.cpu()
        if prev is None:
            return None
        per_vector = (z.cpu() - prev).norm(dim=1).mean().item()
        return per_vector / self.cfg.schedule.drift_every

    @torch.no_grad()
    def _write_samples(self, step: int) -> dict[str, Path]:
        model = self.unwrapped
        was_training = model.training
        model.eval()
        recon, _ = model(self.probe)
        model.train(was_training)
        (self.out / "samples").mkdir(exist_ok=True)
        grid = self.out / "samples" / f"recon_step{step:07d}.png"
        save_recon_grid(self.probe.cpu(), recon.cpu(), grid)
        records = self.metrics.read()
        name = f"{self.cfg.quantizer.name}, K={self.cfg.quantizer.num_codes}"
        plot_usage(records, self.out / "usage.png", f"{name}: codebook usage during training")
        plot_drift(records, self.out / "drift.png", f"{name}: encoder drift on a fixed probe batch")
        plot_kernel_regime(records, self.out / "kernel_regime.png", f"{name}: NS-VQ kernel regime")
        return {"reconstructions": grid}

    def _before_step(self, step: int) -> dict:
        return apply_schedules(self.unwrapped.quantize, step, self.total_steps, self.steps_per_epoch, self.cfg.schedule)

    def _after_step(self, step: int, logs: dict) -> None:
        logs.update(epoch=step // self.steps_per_epoch, lr=self.sched.get_last_lr()[0],
                    frozen_encoder=encoder_frozen(step - 1, self.cfg.schedule))
        if step % self.steps_per_epoch == 0:
            self._close_epoch(logs)
        if step % self.cfg.schedule.drift_every == 0:
            drift = self._drift()
            if drift is not None:
                logs["drift"] = drift

    def _log_now(self, step: int, logs: dict) -> bool:
        return step % self.cfg.train.log_every == 0 or "drift" in logs or "usage_epoch" in logs

    def _postfix(self, logs: dict) -> dict:
        return {"loss": f"{logs['loss']:.4f}", "usage": f"{logs['usage']:.2f}"}

    def _finish(self, step: int, seconds: float) -> Path:
        final = self.out / "tokenizer"
        if self.acc.is_main_process:
            self.unwrapped.save_pretrained(final, safe_serialization=True)
            run = {"status": "finished" if step >= self.total_steps else "stopped", "step": step,
                   "total_steps": self.total_steps, "seconds_this_session": round(seconds, 1),
                   "skipped_images": len(self.skipped), "skipped_files": self.skipped[:100],
                   "usage_epoch": self.state.extra.get("usage_epoch"),  # None: no epoch completed
                   "world_size": self.acc.num_processes, "mixed_precision": self.acc.mixed_precision,
                   "data_fit": self.data_fit}  # how the input shape was chosen (stage1_tokenizer.data_fit)
            write_atomic(self.out / "run.json", json.dumps(run, indent=2))
        self.acc.wait_for_everyone()
        return final


def train_tokenizer(cfg: TokenizerConfig, output_dir: str | Path, resume: bool = False,
                    max_steps: int | None = None, data_fit: dict | None = None) -> Path:
    """Train (or resume) a tokenizer run; returns the folder of the final safetensors weights. ``data_fit``: the
    record of how the input shape was chosen, kept in run.json."""
    return TokenizerTrainer(cfg, output_dir, resume=resume, data_fit=data_fit).train(max_steps)


def load_run(run_dir: str | Path) -> tuple[TokenizerConfig, VQTokenizer]:
    """The resolved config and final weights of a finished stage-1 run, in eval mode."""
    run = Path(run_dir)
    if not (run / "config.yaml").exists() or not (run / "tokenizer").exists():
        raise ValueError(f"{run} is not a finished tokenizer run (needs config.yaml and tokenizer/)")
    cfg = from_dict(TokenizerConfig, yaml.safe_load((run / "config.yaml").read_text()))
    return cfg, VQTokenizer.from_pretrained(run / "tokenizer").eval()
