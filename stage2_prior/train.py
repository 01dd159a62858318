"""Stage-2 training: a GPT prior or a latent diffusion UNet on a frozen tokenizer's code cache.

    vqgen train-prior --tokenizer runs/t --kind gpt --preset tiny --output-dir runs/t-gpt

Both run on stage 1's :class:`~common.loop.TrainLoop` (resume, progress, metrics, checkpoints).
"""
from __future__ import annotations

import abc
import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers import LDMPipeline
from diffusers.training_utils import EMAModel
from torch.utils.data import TensorDataset
from torchvision.utils import save_image
from transformers import get_cosine_with_min_lr_schedule_with_warmup
from transformers.pytorch_utils import Conv1D

from common.atomic import write_atomic
from common.loop import TrainLoop
from common.plots import plot_validation
from stage1_tokenizer.train import load_run

from .attention import fit_attention
from .codes import load_codes
from .cond_ldm_pipeline import ClassConditionalLDMPipeline
from .config import PriorConfig, default_top_k
from .gpt import build_gpt, p_keep_at, training_pair
from .labels import drop_labels, unet_labels
from .ldm import build_noise_scheduler, build_unet, diffusion_loss, sampling_scheduler
from .vqgpt_pipeline import codes_to_sequence, generation_config, sample_sequences, sequence_to_codes, start_tokens


def decayed_parameters(model: torch.nn.Module) -> set[int]:
    """Ids of the weights of linear layers (``nn.Linear``, GPT-2's ``Conv1D``, convolutions): the parameters the
    released code decays. Embeddings, norms and biases are not, nor a head tied to the token embedding."""
    linear = (torch.nn.Linear, Conv1D, torch.nn.Conv2d)
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return {id(m.weight) for m in model.modules() if isinstance(m, linear) and id(m.weight) not in embedded}


def adamw(model: torch.nn.Module, lr: float, betas, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the weights of linear layers only (as released; docs/fidelity.md)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decayed = decayed_parameters(model)
    groups = [{"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def split_validation(n: int, fraction: float, max_examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) example indices: a seeded permutation, its first ``min(round(fraction n), max_examples)``
    held out (at least one when ``fraction`` > 0), so a resumed run holds out the same examples."""
    held = min(max(1, round(fraction * n)), max_examples) if fraction > 0 else 0
    if held >= n:
        raise ValueError(f"holding out {held} of {n} examples leaves none to train on; lower train.val_fraction")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[held:].sort().values, order[:held].sort().values


class PriorTrainer(TrainLoop):
    """What both priors share: the frozen tokenizer, its code cache, AdamW + warm-up/cosine, the run files."""

    def __init__(self, cfg: PriorConfig, output_dir: str | Path, resume: bool = False):
        if not cfg.tokenizer:
            raise ValueError("set the tokenizer run directory (--tokenizer RUN_DIR or tokenizer=...)")
        super().__init__(cfg, output_dir, resume)
        # one process encodes (when needed) before the others read its cache; before load_run, because
        # encoding writes the tokenizer's scaling_factor
        self.codes = load_codes(cfg.tokenizer, num_images=cfg.num_images) if self.acc.is_main_process else None
        self.acc.wait_for_everyone()
        if self.codes is None:
            self.codes = load_codes(cfg.tokenizer, num_images=cfg.num_images)
        self.tokenizer_cfg, tokenizer = load_run(cfg.tokenizer)
        tokenizer.set_hard_inference(True)
        self.tokenizer = tokenizer.to(self.acc.device).requires_grad_(False)
        tok = Path(cfg.tokenizer).resolve()  # a sweep's tokenizer lives in <run>/tokenizer: name the run
        self.desc = f"{cfg.kind}[{tok.parent.name if tok.name == 'tokenizer' else tok.name}]"
        t = cfg.train
        set_seed(t.seed)  # encoding the code cache (first use only) draws random numbers: the initial weights must not
        model, examples = self._build()  # depend on whether the cache already existed
        train_idx, val_idx = split_validation(len(examples[0]), t.val_fraction, t.val_max_examples, t.seed)
        self.val = tuple(x[val_idx] for x in examples)
        self.train_probe = tuple(x[train_idx[:len(val_idx)]] for x in examples)  # same size: curves comparable
        self.out.mkdir(parents=True, exist_ok=True)
        self.opt = adamw(model, t.lr, t.betas, t.weight_decay)
        self.model, self.opt, loader = self.acc.prepare(model, self.opt,
                                                        self._loader(TensorDataset(*(x[train_idx] for x in examples))))
        self._start(loader)
        warmup = min(t.warmup_steps, self.total_steps // 2)  # small runs: never warm up past half-way
        self.sched = self.acc.prepare(get_cosine_with_min_lr_schedule_with_warmup(
            self.opt, warmup, self.total_steps, min_lr_rate=t.min_lr_ratio))
        self._register_extra()
        self._resume_or_begin(resume)
        self.model.train()

    @abc.abstractmethod
    def _build(self) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
        """The model to train and its examples (code sequences or latents, labels), split here into train/held-out."""

    def _register_extra(self) -> None:
        """Further state to checkpoint (the LDM's EMA weights)."""

    val_metric = "loss"  # what ``_heldout`` measures, logged as ``val_<metric>`` and ``train_<metric>``

    @abc.abstractmethod
    def _heldout(self, examples: tuple[torch.Tensor, ...], which: str) -> float:
        """``val_metric`` of the model under training on fixed ``examples``, deterministically (eval mode)."""

    def _after_step(self, step: int, logs: dict) -> None:
        """Every ``val_every`` steps and at the last: the metric on the held-out set and on as many training
        examples (the same protocol, so the gap is the generalisation gap)."""
        if not (len(self.val[0]) and self.acc.is_main_process
                and (step % self.cfg.train.val_every == 0 or step == self.total_steps)):
            return
        model = self.unwrapped
        model.eval()
        with torch.no_grad(), self.acc.autocast():
            for which, examples in (("val", self.val), ("train", self.train_probe)):
                logs[f"{which}_{self.val_metric}"] = self._heldout(examples, which)
        model.train()

    def _log_now(self, step: int, logs: dict) -> bool:
        return super()._log_now(step, logs) or f"val_{self.val_metric}" in logs

    def _validation_summary(self) -> dict:
        """Final and best held-out metric from metrics.jsonl, and the validation curves (``validation.png``)."""
        records = self.metrics.read()
        key = f"val_{self.val_metric}"
        rows = [r for r in records if key in r]
        if not rows:
            return {}
        plot_validation(records, self.val_metric, self.out / "validation.png", self.desc)
        best = min(rows, key=lambda r: r[key])
        return {key: rows[-1][key], f"train_{self.val_metric}": rows[-1][f"train_{self.val_metric}"],
                f"best_{key}": best[key], f"best_{key}_step": best["step"], "num_val_examples": len(self.val[0])}

    def _write_samples(self, step: int) -> dict[str, Path]:
        """The sample grid of this step; with ``sample.num_samples: 0`` only the validation plot (a large model's
        grid costs minutes on a CPU)."""
        if not self.cfg.sample.num_samples:
            self._validation_summary()
            return {}
        return self._write_grid(self.sample_images(self.cfg.sample.num_samples, self.cfg.sample.seed).cpu(), step)

    def _write_grid(self, images: torch.Tensor, step: int) -> dict[str, Path]:
        """Images in [0, 1] -> ``samples/samples_step<step>.png`` and ``samples.png`` (the latest)."""
        (self.out / "samples").mkdir(exist_ok=True)
        self._validation_summary()  # refresh validation.png beside the grids
        nrow = max(1, int(len(images) ** 0.5))
        save_image(images, self.out / "samples" / f"samples_step{step:07d}.png", nrow=nrow, padding=1)
        save_image(images, self.out / "samples.png", nrow=nrow, padding=1)
        return {"samples": self.out / "samples.png"}

    def _conditional_classes(self, section: str, conditional: bool, label_dropout: float) -> int:
        """The prior's number of classes (0: unconditional); a conditional prior needs labels, and guidance a null
        class trained by label dropout."""
        n = self.codes.num_classes if conditional else 0
        if conditional and n == 0:
            raise ValueError(f"{section}.class_conditional needs labelled data; this tokenizer's dataset has no labels")
        if self.cfg.sample.guidance_scale != 1.0 and not (n and label_dropout > 0):
            raise ValueError(f"sample.guidance_scale needs {section}.class_conditional with {section}.label_dropout > 0 "
                             "(the null class is what guidance subtracts)")
        return n

    def _run_json(self, step: int, seconds: float, **extra) -> None:
        run = {"kind": self.cfg.kind, "tokenizer": str(Path(self.cfg.tokenizer).resolve()),
               "tokenizer_hash": self.codes.tokenizer_hash, "status": "finished" if step >= self.total_steps else "stopped",
               "step": step, "total_steps": self.total_steps, "seconds_this_session": round(seconds, 1),
               "num_training_codes": len(self.codes.indices) - len(self.val[0]), "world_size": self.acc.num_processes,
               "mixed_precision": self.acc.mixed_precision, "id2label": self.codes.id2label,
               **self._validation_summary(), **extra}
        write_atomic(self.out / "run.json", json.dumps(run, indent=2))


class GPTTrainer(PriorTrainer):
    """Next-code prediction on ``p_keep``-corrupted inputs with uncorrupted targets (DiVeQ Sec. A.2)."""

    def _build(self):
        cfg, codes = self.cfg, self.codes
        self.grid = tuple(codes.indices.shape[1:])
        seq = codes_to_sequence(codes.indices)
        self.num_classes = self._conditional_classes("gpt", cfg.gpt.class_conditional, cfg.gpt.label_dropout)
        self.seq_len = seq.shape[1]
        self.top_k = min(cfg.sample.top_k or default_top_k(codes.num_codes), codes.num_codes)
        model = fit_attention(build_gpt(cfg.gpt, codes.num_codes, self.seq_len, self.num_classes), self.acc.device)
        model.generation_config = generation_config(codes.num_codes, model.config.vocab_size, self.top_k,
                                                    cfg.sample.temperature)
        return model, (seq, codes.labels)

    val_metric = "bits_per_token"

    def _heldout(self, examples, which: str) -> float:
        """Negative log-likelihood in bits per code token under teacher forcing on clean inputs (p_keep = 1)."""
        seq, labels = examples
        device, total = self.acc.device, 0.0
        for chunk, lab in zip(seq.split(4 * self.cfg.train.batch_size), labels.split(4 * self.cfg.train.batch_size)):
            chunk = chunk.to(device)
            start = start_tokens(len(chunk), self.codes.num_codes, lab if self.num_classes else None).to(device)
            logits = self.unwrapped(input_ids=torch.cat([start, chunk[:, :-1]], dim=1), use_cache=False).logits
            total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), chunk.reshape(-1), reduction="sum").item()
        return total / seq.numel() / math.log(2)

    def _before_step(self, step: int) -> dict:
        g = self.cfg.gpt
        self.p_keep = p_keep_at(step, self.total_steps, g.p_keep_start, g.p_keep_end)
        return {"p_keep": self.p_keep}

    def _step(self, batch, step: int) -> dict:
        seq, labels = batch
        K = self.codes.num_codes
        with self.acc.accumulate(self.model):
            inputs, targets = training_pair(seq, K, self.p_keep, labels if self.num_classes else None,
                                            label_dropout=self.cfg.gpt.label_dropout)
            logits = self.train_model(input_ids=inputs, use_cache=False).logits  # teacher forcing reads no KV cache
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
            self._optimise(loss, step)
        return {"loss": loss.detach(), "lr": self.sched.get_last_lr()[0]}

    @torch.no_grad()
    def sample_images(self, n: int, seed: int) -> torch.Tensor:
        """``n`` images in [0, 1] (class-conditional models cycle through the classes)."""
        model = self.unwrapped
        was_training = model.training
        model.eval()
        labels = torch.arange(n) % self.num_classes if self.num_classes else None
        s = self.cfg.sample
        seq = sample_sequences(model, n, self.codes.num_codes, self.seq_len, self.top_k, s.temperature,
                               torch.Generator().manual_seed(seed), labels, top_p=s.top_p,
                               guidance_scale=s.guidance_scale if self.num_classes else 1.0, cfg_interval=s.cfg_interval)
        model.train(was_training)
        images = self.tokenizer.decode_indices(sequence_to_codes(seq, self.grid))
        return (images.float().clamp(-1, 1) + 1) / 2

    def _finish(self, step: int, seconds: float) -> Path:
        final = self.out / "transformer"
        if self.acc.is_main_process:
            self.unwrapped.save_pretrained(final, safe_serialization=True)
            self._run_json(step, seconds, grid=list(self.grid), seq_len=self.seq_len, num_codes=self.codes.num_codes,
                           num_classes=self.num_classes, top_k=self.top_k, temperature=self.cfg.sample.temperature,
                           top_p=self.cfg.sample.top_p, guidance_scale=self.cfg.sample.guidance_scale,
                           cfg_interval=self.cfg.sample.cfg_interval,
                           label_dropout=self.cfg.gpt.label_dropout if self.num_classes else 0.0)
        self.acc.wait_for_everyone()
        return final


class LDMTrainer(PriorTrainer):
    """DDPM noise prediction on unit-variance quantised latents (per-channel centred first with
    ``ldm.center_latents``); an EMA of the UNet is what gets saved."""

    def _build(self):
        latents, mean, scale = self.codes.latents, None, self.codes.scaling_factor
        if self.cfg.ldm.center_latents:
            mean = latents.mean((0, 2, 3), keepdim=True)
            latents = latents - mean
            scale, mean = 1 / latents.std().item(), mean.flatten().tolist()
        # the tokenizer in memory decodes as the export will: add the mean back, then re-quantise
        self.tokenizer.register_to_config(scaling_factor=scale, latents_mean=mean)
        latents = latents * scale
        _, channels, h, w = latents.shape
        if h != w:
            raise ValueError(f"the LDM needs square latent grids, got {h}x{w}")
        ldm = self.cfg.ldm
        self.num_classes = self._conditional_classes("ldm", ldm.class_conditional, ldm.label_dropout)
        unet = fit_attention(build_unet(self.cfg.ldm, channels, h, self.num_classes), self.acc.device)
        self.noise_scheduler = build_noise_scheduler(self.cfg.ldm)
        self.ema = EMAModel(unet.parameters(), decay=self.cfg.ldm.ema_decay, model_cls=type(unet),
                            model_config=unet.config)
        self.ema.to(self.acc.device)
        return unet, (latents, self.codes.labels)

    val_metric = "denoising_loss"

    def _heldout(self, examples, which: str) -> float:
        """The diffusion loss with noise and timesteps fixed per example (drawn once from the run's seed), so
        successive validations differ only by the weights."""
        latents, labels = examples
        g = torch.Generator().manual_seed(self.cfg.train.seed + (which == "train"))
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),), generator=g)
        device, total, size = self.acc.device, 0.0, 4 * self.cfg.train.batch_size
        for x, n, tt, y in zip(latents.split(size), noise.split(size), t.split(size), labels.split(size)):
            y = y.to(device) if self.num_classes else None
            loss = diffusion_loss(self.unwrapped, self.noise_scheduler, x.to(device), n.to(device), tt.to(device), y)
            total += loss.item() * len(x)
        return total / len(latents)

    def _register_extra(self) -> None:
        self.acc.register_for_checkpointing(self.ema)

    def _step(self, batch, step: int) -> dict:
        latents, labels = batch
        y = unet_labels(drop_labels(labels, self.cfg.ldm.label_dropout), self.num_classes) if self.num_classes else None
        with self.acc.accumulate(self.model):
            loss = diffusion_loss(self.train_model, self.noise_scheduler, latents, class_labels=y)
            self._optimise(loss, step)
        if self.acc.sync_gradients:
            self.ema.step(self.model.parameters())
        return {"loss": loss.detach(), "lr": self.sched.get_last_lr()[0]}

    def ema_unet(self):
        """A copy of the UNet holding the EMA weights."""
        unet = copy.deepcopy(self.unwrapped)
        self.ema.copy_to(unet.parameters())
        return unet.eval()

    @torch.no_grad()
    def sample_images(self, n: int, seed: int) -> torch.Tensor:
        """``n`` images in [0, 1] (class-conditional models cycle through the classes, guided as configured)."""
        parts = dict(vqvae=self.tokenizer, unet=self.ema_unet(), scheduler=sampling_scheduler(self.noise_scheduler))
        extra = {}
        if self.num_classes:
            pipe = ClassConditionalLDMPipeline(**parts, num_classes=self.num_classes,
                                               guidance_scale=self.cfg.sample.guidance_scale)
            extra["class_labels"] = torch.arange(n) % self.num_classes
        else:
            pipe = LDMPipeline(**parts)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(batch_size=n, generator=torch.Generator().manual_seed(seed), eta=self.cfg.ldm.eta,
                   num_inference_steps=self.cfg.ldm.num_inference_steps, output_type="np", **extra)
        return torch.from_numpy(out.images).permute(0, 3, 1, 2)

    def _finish(self, step: int, seconds: float) -> Path:
        final = self.out / "unet"
        if self.acc.is_main_process:
            self.ema_unet().save_pretrained(final, safe_serialization=True)
            sampling_scheduler(self.noise_scheduler).save_pretrained(self.out / "scheduler")
            tok = self.tokenizer.config
            self._run_json(step, seconds, scaling_factor=tok.scaling_factor, latents_mean=tok.latents_mean,
                           latent_shape=list(self.codes.latents.shape[1:]), num_classes=self.num_classes,
                           guidance_scale=self.cfg.sample.guidance_scale,
                           label_dropout=self.cfg.ldm.label_dropout if self.num_classes else 0.0)
        self.acc.wait_for_everyone()
        return final


TRAINERS = {"gpt": GPTTrainer, "ldm": LDMTrainer}


def train_prior(cfg: PriorConfig, output_dir: str | Path, resume: bool = False, max_steps: int | None = None) -> Path:
    """Train (or resume) a prior of ``cfg.kind`` on ``cfg.tokenizer``'s codes; returns its final weights folder."""
    return TRAINERS[cfg.kind](cfg, output_dir, resume=resume).train(max_steps)
