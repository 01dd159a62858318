"""``vqgen sweep``: the whole study. For each quantizer: train the tokenizer, evaluate reconstruction, cache
codes, train the GPT and LDM priors, export both pipelines, compute their gFID; then one report.

Every stage writes into ``OUTPUT/<run>/`` and is skipped when its artifact exists; a killed sweep resumes
the unfinished stage from its last checkpoint; one run failing is recorded and the others go on.
Under ``accelerate launch`` the training stages run on every process and the rest on the main one.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from accelerate.utils import broadcast_object_list

from common.atomic import disk_error_line, read_json, write_atomic
from common.config_loader import load_config, presets, save_config, with_overrides
from common.run_lock import LEASE_S, RunLock
from common.runtime import process_state
from common.tracking import trackers_for
from eval.fid import images_per_second
from eval.fid_modes import FID_MODES
from pipelines.export import SIDECAR, export_prior
from pipelines.sample import gfid
from stage1_tokenizer.config import load_tokenizer_config
from stage1_tokenizer.data_fit import announce, fit_to_data, inspect_data, typed_fields
from stage1_tokenizer.evaluate import evaluate_tokenizer
from stage1_tokenizer.quantizers import QUANTIZERS
from stage1_tokenizer.train import train_tokenizer
from stage2_prior.config import KINDS, load_prior_config
from stage2_prior.train import train_prior

from .report import write_report

logger = logging.getLogger(__name__)
CURVE_KEYS = ("guidance_scale", "gfid", "gfid_ci", "kid", "kid_std", "precision", "recall", "class_consistency")
DEFAULT_QUANTIZERS = ["vq", "ema", "simvq", "transvq", "ns-vq", "diveq", "sf-diveq", "rotation"]


@dataclass
class SweepConfig:
    """What to compare and how hard: presets for each stage plus per-stage ``key=value`` overrides."""

    quantizers: list[str] = field(default_factory=lambda: list(DEFAULT_QUANTIZERS))
    num_codes: list[int] = field(default_factory=list)  # codebook sizes to cross with the quantizers; [] = preset's
    seeds: list[int] = field(default_factory=lambda: [0])
    data: str = "mnist"
    dataset_name: str | None = None  # what exports and cards call the data: a Hub dataset id or a plain name
    preset: str = "tiny"  # tokenizer preset (stage1_tokenizer/presets/tokenizer/)
    tokenizer: list[str] = field(default_factory=list)  # overrides for every tokenizer
    quantizer_options: dict = field(default_factory=dict)  # {variant: {option: value}}
    gpt_preset: str = "tiny"
    gpt: list[str] = field(default_factory=list)
    ldm_preset: str = "tiny"
    ldm: list[str] = field(default_factory=list)
    priors: list[str] = field(default_factory=lambda: list(KINDS))  # [] : tokenizers and their evaluation only
    conditional: bool = False  # class-conditional priors with label dropout (labelled data), guided at sample.guidance_scale
    guidance_scales: list[float] = field(default_factory=list)  # each prior also scored at these: the guidance curve
    eval_images: int = 1000  # held-out images for rFID / LPIPS / SSIM / PSNR / usage
    gfid_images: int = 1000  # samples per prior for gFID
    ref_images: int | None = None  # training images in the gFID reference statistics (default: gfid_images)
    sample_batch_size: int = 50
    fid_mode: str = "clean"  # FID protocol of rFID and gFID: clean | legacy_tensorflow | legacy_pytorch (eval/fid_modes.py)
    max_steps: int | None = None  # cap on every training stage (smoke runs)
    # with max_steps set, eval_images, gfid_images and ref_images are capped at this and the report says its
    # numbers are not comparable (0: evaluate at full size anyway)
    smoke_images: int = 100
    archive: str | None = None  # keep each finished run's results (no weights) here; archived runs are not rerun
    # stop once this many runs in a row fail with the same error: a broken environment, not a variant (0: never);
    # the runs not yet started stay unstarted instead of each being marked failed
    stop_after_failures: int = 3
    report_to: str = "none"  # experiment tracker of every training stage: tensorboard | wandb | all | none

    def __post_init__(self):
        unknown = [q for q in self.quantizers if q not in QUANTIZERS]
        if unknown:
            raise ValueError(f"unknown quantizer(s) {', '.join(unknown)}; choose from {', '.join(QUANTIZERS)} or 'all'")
        if not self.quantizers or not self.seeds:
            raise ValueError("a sweep needs at least one quantizer and one seed")
        if self.stop_after_failures < 0:
            raise ValueError(f"stop_after_failures must be >= 0 (0: never stop), got {self.stop_after_failures}")
        if self.fid_mode not in FID_MODES:
            raise ValueError(f"unknown fid_mode {self.fid_mode!r}; choose from {', '.join(FID_MODES)}")
        if self.smoke_images < 0:
            raise ValueError(f"smoke_images must be >= 0 (0: no cap), got {self.smoke_images}")
        if self.guidance_scales and not self.conditional:
            raise ValueError("guidance_scales need conditional: true (an unconditional prior has nothing to guide)")
        if unknown := [p for p in self.priors if p not in KINDS]:
            raise ValueError(f"unknown prior(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
        trackers_for(self.report_to)  # an unknown or uninstalled tracker fails before any run starts

    @property
    def smoke(self) -> bool:
        """Whether this is a smoke run: training capped and the evaluation cut to ``smoke_images``."""
        return self.max_steps is not None and self.smoke_images > 0

    def evaluation_counts(self) -> tuple[int, int, int]:
        """(held-out images per tokenizer, samples per prior, reference images) this sweep evaluates with."""
        counts = (self.eval_images, self.gfid_images, self.ref_images or self.gfid_images)
        return tuple(min(n, self.smoke_images) for n in counts) if self.smoke else counts

    def runs(self) -> list[tuple[str, str, int | None, int]]:
        """(run name, quantizer, K or None, seed) for every combination, seed-major then in ``quantizers`` order: a
        study cut short has its first quantizers at every K for the first seed.

        Names carry K and the seed when they vary; with ``archive`` set always (``vq-K512-s0``, K from the preset
        when not swept; a staged schedule's freeze step too, ``ns-vq-freeze1250-K1024-s0``), so narrowed sweeps
        into one archive or output folder never share a name, nor resume each other's runs."""
        sizes = self.num_codes or [None]
        preset = load_tokenizer_config(self.preset, list(self.tokenizer)) if self.archive else None
        # a staged schedule is a variant of its own: its runs never share a name (or a checkpoint) with the plain ones
        staged = f"-freeze{preset.schedule.freeze_encoder_at}" if preset and preset.schedule.freeze_encoder_at else ""
        out = []
        for seed in self.seeds:
            for q in self.quantizers:
                for k in sizes:
                    if self.archive:
                        name = f"{q}{staged}-K{k or preset.quantizer.num_codes}-s{seed}"
                    else:
                        name = q + (f"-K{k}" if len(sizes) > 1 else "") + (f"-s{seed}" if len(self.seeds) > 1 else "")
                    out.append((name, q, k, seed))
        return out


def load_sweep_config(preset: str = "demo", overrides: list[str] | None = None) -> SweepConfig:
    """``study/presets/sweep/<preset>.yaml`` (or a YAML path) + ``key=value`` overrides."""
    return load_config(SweepConfig, preset, overrides, presets(__package__, "sweep"))


def curve_fields(result: dict) -> dict:
    """A gFID result's fields that make one point of a guidance curve."""
    return {k: result[k] for k in CURVE_KEYS if k in result}


def _finished(run_dir: Path) -> bool:
    path = run_dir / "run.json"
    return (read_json(path) or {}).get("status") == "finished"


def _cap(cfg, max_steps: int | None):
    """``cfg`` with its training capped at ``max_steps`` steps (smoke runs); ``None`` leaves it as it is."""
    if max_steps is None:
        return cfg
    return replace(cfg, train=replace(cfg.train, max_steps=min(cfg.train.max_steps or max_steps, max_steps)))


ARCHIVED = "ARCHIVED"
LOCK_FILE = ".lock"  # in each run's folder while a process trains it (common/run_lock.py)
POLL_S = 15.0  # how often a sweep with only runs held elsewhere left looks at them again
ARCHIVE_FILES = ("config.yaml", "metrics.jsonl", "eval.json", "eval_recon.png", "run.json")


def archive_run(run: Path, dest: Path) -> Path:
    """Copy a finished run's results (configs, metrics, evaluation, gFID, grids; no weights) to ``dest``, in the
    layout the report reads, then mark it complete. Written to a temp folder and renamed, so a kill leaves none."""
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = run / "tokenizer"
    for name in ARCHIVE_FILES:
        if (tok / name).exists():
            shutil.copyfile(tok / name, tmp / name)
    generation = json.loads((tok / "generation.json").read_text()) if (tok / "generation.json").exists() else {}
    for kind, result in generation.items():
        for key, name in (("grid", f"samples_{kind}.png"), ("validation_plot", f"validation_{kind}.png")):
            if result.get(key):
                shutil.copyfile(result[key], tmp / name)
                result[key] = name  # relative: read against the archived run's folder
    (tmp / "generation.json").write_text(json.dumps(generation, indent=2))
    shutil.copyfile(run / "timings.json", tmp / "timings.json")
    (tmp / ARCHIVED).write_text(str(run))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


class Sweep:
    """Runs the stages of every (quantizer, K, seed) in ``cfg`` under ``out``."""

    def __init__(self, cfg: SweepConfig, out: str | Path, shard: tuple[int, int] = (0, 1), keep_shape: str | None = None):
        """``keep_shape``: what the user named that holds the tokenizer's input shape (``--config rgb64``); None:
        the data decides the channels, resolution and depth the tokenizer overrides leave open."""
        index, count = shard
        if not 0 <= index < count:
            raise ValueError(f"shard {index}/{count}: need 0 <= index < count")
        self.cfg, self.out, self.shard = cfg, Path(out), shard
        self.typed = typed_fields(cfg.tokenizer, keep_shape)
        self.lease_s, self.poll_s = LEASE_S, POLL_S
        self._announced_waits = []
        self.announced = False
        self.state = process_state()

    def _main_only(self, fn, *args, **kwargs):
        """Run ``fn`` on the main process while the others wait; its failure is raised on every process, so
        all of them skip to the next run together."""
        result, error = None, None
        if self.state.is_main_process:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:
                error = e
        failed = [f"{type(error).__name__}: {error}" if error is not None else None]
        if self.state.num_processes > 1:
            broadcast_object_list(failed)
        if error is not None:
            raise error
        if failed[0]:
            raise RuntimeError(f"failed on the main process: {failed[0]}")
        return result

    def _timed(self, run: Path, stage: str, fn, *args, **kwargs):
        start = time.time()
        result = fn(*args, **kwargs)
        if self.state.is_main_process:
            path = run / "timings.json"
            timings = read_json(path, {})
            timings[stage] = round(timings.get(stage, 0.0) + time.time() - start, 1)
            write_atomic(path, json.dumps(timings, indent=2))
        return result

    @cached_property
    def profile(self):
        """The sweep's data, looked at once, when the first tokenizer trains (None for sources without a profile)."""
        return inspect_data(self.cfg.data)

    # --- stages ------------------------------------------------------------------------------
    def _train_section(self, train, run: Path, stage: str, seed: int):
        """A stage's ``train`` section with the run's seed and one tracker run per stage, named after the sweep run
        (``vq-K512-s0-gpt``)."""
        return replace(train, seed=seed, report_to=self.cfg.report_to, run_name=f"{run.name}-{stage}")

    def tokenizer(self, run: Path, quantizer: str, num_codes: int | None, seed: int) -> Path:
        tok = run / "tokenizer"
        if not _finished(tok):
            cfg = load_tokenizer_config(self.cfg.preset)
            q = cfg.quantizer
            cfg = replace(cfg, quantizer=replace(q, name=quantizer, num_codes=num_codes or q.num_codes,
                                                 options={**q.options, **self.cfg.quantizer_options.get(quantizer, {})}),
                          data=replace(cfg.data, source=self.cfg.data),
                          train=self._train_section(cfg.train, run, "tokenizer", seed))
            cfg = _cap(with_overrides(cfg, self.cfg.tokenizer), self.cfg.max_steps)  # the user's overrides win
            cfg, fit = fit_to_data(cfg, self.profile, self.typed)
            if not self.announced:  # once per sweep: every run shares it
                announce(fit)
                self.announced = True
            self._timed(run, "tokenizer", train_tokenizer, cfg, tok, resume=(tok / "config.yaml").exists(), data_fit=fit)
        if read_json(tok / "eval.json") is None:
            self._main_only(self._timed, run, "evaluate", evaluate_tokenizer, tok,
                            num_images=self.cfg.evaluation_counts()[0], fid_mode=self.cfg.fid_mode)
        return tok  # the code cache is built by the first prior's trainer (on the main process)

    def prior(self, run: Path, tok: Path, kind: str, seed: int) -> None:
        prior_dir = run / kind
        if not _finished(prior_dir):
            preset, overrides = self._prior_preset(kind)
            cfg = load_prior_config(kind, preset)
            cfg = replace(cfg, tokenizer=str(tok), train=self._train_section(cfg.train, run, kind, seed))
            conditional = [f"{kind}.class_conditional=true"] if self.cfg.conditional else []
            cfg = _cap(with_overrides(cfg, conditional + list(overrides)), self.cfg.max_steps)  # the user's overrides win
            self._timed(run, kind, train_prior, cfg, prior_dir, resume=(prior_dir / "config.yaml").exists())
        self._main_only(self._publishable, run, tok, prior_dir, kind)

    def _prior_preset(self, kind: str) -> tuple[str, list[str]]:
        """The prior's preset and the sweep's overrides of it."""
        return (self.cfg.gpt_preset, self.cfg.gpt) if kind == "gpt" else (self.cfg.ldm_preset, self.cfg.ldm)

    def _resampled_scales(self, kind: str) -> list[float]:
        """The curve's scales that sample again: all but the prior's own, whose point is its main score."""
        preset, overrides = self._prior_preset(kind)
        own = with_overrides(load_prior_config(kind, preset), list(overrides)).sample.guidance_scale
        return [s for s in self.cfg.guidance_scales if s != own]

    def _publishable(self, run: Path, tok: Path, prior_dir: Path, kind: str) -> None:
        """Export the pipeline (atomically) and score its gFID; both skipped when already done."""
        pipe_dir = run / "pipelines" / kind
        if not (pipe_dir / "model_index.json").exists():
            tmp = pipe_dir.with_name(f".tmp-{kind}")
            shutil.rmtree(tmp, ignore_errors=True)
            self._timed(run, f"export_{kind}", export_prior, prior_dir, tmp, self.cfg.dataset_name)
            shutil.rmtree(pipe_dir, ignore_errors=True)
            tmp.rename(pipe_dir)
        gen_path = tok / "generation.json"
        generation = read_json(gen_path, {})
        if kind in generation:
            return
        _, samples, refs = self.cfg.evaluation_counts()
        result = self._timed(run, f"gfid_{kind}", gfid, pipe_dir, self.cfg.data, num_images=samples,
                             batch_size=self.cfg.sample_batch_size, ref_images=refs, save_grid=pipe_dir / "samples.png",
                             fid_mode=self.cfg.fid_mode)
        result["grid"] = str(pipe_dir / "samples.png")
        if self.cfg.guidance_scales:
            own = curve_fields(result)  # the main score is the curve at its own scale
            result["curve"] = [own if s == result.get("guidance_scale") else self._curve_point(run, kind, pipe_dir, s)
                               for s in self.cfg.guidance_scales]
        prior_run = json.loads((prior_dir / "run.json").read_text())  # its held-out metric, final and best
        result.update({k: v for k, v in prior_run.items() if k.startswith(("val_", "train_", "best_val_"))})
        if (prior_dir / "validation.png").exists():
            result["validation_plot"] = str(prior_dir / "validation.png")
        evaluation = json.loads((tok / "eval.json").read_text())
        sidecar = json.loads((pipe_dir / SIDECAR).read_text())
        sidecar["metrics"] = {**{k: result[k] for k in ("gfid", "gfid_ci", "kid", "kid_std", "precision", "recall",
                                                        "num_images", "fid_mode")},
                              **{k: evaluation.get(k) for k in ("rfid", "rfid_ci", "usage", "perplexity")}}
        write_atomic(pipe_dir / SIDECAR, json.dumps(sidecar, indent=2))
        generation[kind] = result
        write_atomic(gen_path, json.dumps(generation, indent=2))

    def _curve_point(self, run: Path, kind: str, pipe_dir: Path, scale: float) -> dict:
        """One point of the guidance curve: gFID, KID, precision, recall (and class consistency) at ``scale``, with
        the sample count and seed of the prior's main score."""
        _, samples, refs = self.cfg.evaluation_counts()
        result = self._timed(run, f"gfid_{kind}_s{scale:g}", gfid, pipe_dir, self.cfg.data, num_images=samples,
                             batch_size=self.cfg.sample_batch_size, ref_images=refs, fid_mode=self.cfg.fid_mode,
                             guidance_scale=scale)
        return curve_fields(result)

    def _say(self, line: str) -> None:
        """One line to the user on stderr, from the main process only."""
        if self.state.is_main_process:
            print(line, file=sys.stderr, flush=True)

    def _claim(self, run: Path) -> RunLock | None:
        """This run's lock (taken by the main process, the decision shared with the others), or None while
        another live process holds it."""
        lock = RunLock(run / LOCK_FILE, self.lease_s)
        held = [lock.acquire() if self.state.is_main_process else None]
        if self.state.num_processes > 1:
            broadcast_object_list(held)
        return lock if held[0] else None

    def evaluation_cost(self, runs: int) -> str:
        """One line: how many Inception images the evaluation of ``runs`` runs needs and about how long that takes
        at the rate measured now, so nobody waits on reference features unawares."""
        held_out, samples, refs = self.cfg.evaluation_counts()
        priors = sum(1 + len(self._resampled_scales(kind)) for kind in self.cfg.priors)  # each scale samples anew
        total = held_out + refs + runs * (held_out + priors * samples)
        rate = images_per_second()
        line = (f"evaluation: {runs} run(s) x ({held_out} reconstructions + {priors} x {samples} prior samples) + "
                f"{held_out} held-out and {refs} reference images = {total:,} Inception images, about "
                f"{total / rate / 60:.1f} min at {rate:.1f} images/s measured now (less where this machine's FID "
                f"cache holds the references)")
        if self.cfg.smoke:
            line += (f"; smoke run (max_steps {self.cfg.max_steps}): counts capped at smoke_images="
                     f"{self.cfg.smoke_images}, numbers not comparable with full runs")
        return line

    # --- the whole sweep -------------------------------------------------------------------------
    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.state.is_main_process:
            save_config(self.cfg, self.out / "sweep.yaml")
        failures, done = {}, {}  # done: run name -> the directory its report reads
        last_error, repeats, stopped = None, 0, None  # repeats: runs in a row that failed with last_error
        start = time.time()
        index, count = self.shard
        pending, waiting = deque(), []  # this shard's runs; those another process holds, retried once ours are done
        for position, (name, quantizer, num_codes, seed) in enumerate(self.cfg.runs()):
            archived = Path(self.cfg.archive) / name if self.cfg.archive else None
            if archived is not None and (archived / ARCHIVED).exists():
                done[name] = archived
            elif position % count == index:  # another shard's runs are reported above once archived
                pending.append((name, quantizer, num_codes, seed))
        if pending:
            self._say(self.evaluation_cost(len(pending)))
        while pending or waiting:
            if not pending:  # every free run is done: wait for those held elsewhere (or take over a gone holder's)
                self._say(f"waiting for {len(waiting)} run(s) held by other processes: "
                          f"{', '.join(w[0] for w in waiting)}")
                time.sleep(self.poll_s)
                pending.extend(waiting)
                waiting = []
                continue
            name, quantizer, num_codes, seed = item = pending.popleft()
            run = self.out / name
            archived = Path(self.cfg.archive) / name if self.cfg.archive else None
            lock = self._claim(run)
            if lock is None:
                if item not in self._announced_waits:
                    self._say(f"run {name} is being trained by another process; moving on to the next free run")
                    self._announced_waits.append(item)
                waiting.append(item)
                continue
            try:
                error_file = run / "error.txt"
                if item in self._announced_waits and error_file.exists() and error_file.stat().st_mtime >= start:
                    # it failed in the process that held it: recorded, not trained a second time
                    failures[name] = "failed in another process: " + error_file.read_text().strip().splitlines()[-1][:300]
                    continue
                tok = self.tokenizer(run, quantizer, num_codes, seed)
                for kind in self.cfg.priors:
                    self.prior(run, tok, kind, seed)
            except Exception as e:  # one variant failing must not stop the others; the report names it
                if disk_error_line(e) is not None:  # but a full disk or an unwritable folder stops them all
                    raise
                failures[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                logger.error("sweep run %s failed: %s", name, failures[name])
                if self.state.is_main_process:
                    run.mkdir(parents=True, exist_ok=True)
                    error_file.write_text(traceback.format_exc())
                error = failures[name].replace(name, "<run>")  # the same cause names each run's own folder
                repeats, last_error = (repeats + 1 if error == last_error else 1), error
                if repeats == self.cfg.stop_after_failures:
                    stopped = (f"stopped after {repeats} runs in a row failed with the same error ({error}): "
                               f"fix it and rerun; the runs not yet started were left unstarted")
                    logger.error("sweep %s", stopped)
                    break
                continue
            else:
                last_error, repeats = None, 0
                error_file.unlink(missing_ok=True)
                if archived is not None and self.state.is_main_process:
                    archive_run(run, archived)
                done[name] = archived if archived is not None else run / "tokenizer"
            finally:
                lock.release()
        seconds = time.time() - start
        if self.state.is_main_process:
            held_out, samples, refs = self.cfg.evaluation_counts()
            smoke = (f"**Smoke run** (training capped at {self.cfg.max_steps} steps, evaluation at "
                     f"{self.cfg.smoke_images} images): its numbers are not comparable with full runs or papers."
                     if self.cfg.smoke else None)
            notes = [*([smoke, ""] if smoke else []),
                     f"Data `{self.cfg.data}`, tokenizer preset `{self.cfg.preset}`, priors `{self.cfg.gpt_preset}` / "
                     f"`{self.cfg.ldm_preset}`; rFID on up to {held_out} held-out images, gFID on "
                     f"{samples} samples per prior vs {refs} training images, FID protocol `{self.cfg.fid_mode}`. This invocation took {seconds / 60:.1f} min (finished stages are skipped; "
                     f"per-stage seconds in each run's timings.json).", *([f"**Sweep {stopped}.**"] if stopped else []), ""]
            write_report(list(done.values()), self.out,
                         "vqgen sweep: which quantizer makes the best tokenizer for generation?", failures, notes,
                         not_comparable=smoke)
        self.state.wait_for_everyone()
        return {"finished": list(done), "failed": failures, "seconds": seconds, "stopped": stopped}
