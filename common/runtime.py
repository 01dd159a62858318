"""Run machinery shared by every training stage: atomic checkpoints, metrics log, seeded data order."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
from torch.utils.data import Sampler

from .atomic import write_atomic


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def set_threads(threads: int | None = None) -> int:
    """Intra-op threads for torch: ``threads``, or one per available CPU; returns the count set."""
    threads = available_cpus() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    return threads

logger = logging.getLogger(__name__)
COMPLETE = "COMPLETE"


def _cpu_only() -> bool:
    return not (torch.cuda.is_available() or torch.backends.mps.is_available())


def process_state() -> PartialState:
    """The process group (rank, world size), set up as :func:`make_accelerator` sets it up: ``torchrun`` on CPU
    becomes gloo DDP only when accelerate is told ``cpu=True``, and the first caller fixes it for the process."""
    return PartialState(cpu=_cpu_only())


def native_bf16() -> bool:
    """Whether bf16 autocast runs natively here: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX.
    Elsewhere (e.g. AVX2-only CPUs) bf16 is emulated and many times slower than fp32 (benchmarks/bench_compile.py)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    if torch.backends.mps.is_available():
        return False
    # torch's capability probes are private: a build without them is treated as having neither
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe() for probe in probes if probe is not None)


def resolve_precision(mixed_precision: str) -> str:
    """``auto`` becomes ``bf16`` where it runs natively (:func:`native_bf16`) and ``no`` elsewhere; the other
    values (checked by ``TrainConfig``) pass through."""
    if mixed_precision == "auto":
        return "bf16" if native_bf16() else "no"
    return mixed_precision


def deterministic() -> None:
    """Same seed, same weights: torch's deterministic kernels (without them some backward on a multi-threaded CPU
    accumulates in thread order; their cost: benchmarks/results/profile.md) and, on CUDA, the cuBLAS workspace
    that makes its matmuls reproducible (set before the first cuBLAS call). ``warn_only``: an op without a
    deterministic kernel warns instead of stopping a run."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def make_accelerator(mixed_precision: str = "no", grad_accum: int = 1, log_with: list[str] | None = None,
                     run_dir: str | Path | None = None) -> Accelerator:
    """CUDA/MPS when present, else CPU (also for ``torchrun`` on CPU, see :func:`process_state`); ``auto``
    precision resolved by :func:`resolve_precision`. Unused parameters are allowed: frozen encoders and
    SF-DiVeQ's warm-up leave some. ``log_with`` names accelerate trackers, which log under ``run_dir/logs``."""
    mixed_precision = resolve_precision(mixed_precision)
    deterministic()
    no_accelerator = _cpu_only()
    # one process may train several models in turn (a sweep) with different precision: accelerate keeps its
    # settings in a process-wide singleton, so clear them (the process group, in PartialState, is kept)
    AcceleratorState._reset_state(reset_partial_state=False)
    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / "logs")) if run_dir else None
    return Accelerator(cpu=no_accelerator, mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
                       log_with=log_with or None, project_config=project)


class TrainingDiverged(RuntimeError):
    """A non-finite loss (or latent): the run stops and the last good checkpoint is kept."""


class TrainState:
    """Counters that must survive a restart; registered with accelerate for checkpointing."""

    def __init__(self):
        self.step = 0
        self.extra: dict = {}

    def state_dict(self) -> dict:
        return {"step": self.step, "extra": self.extra}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.extra = int(state["step"]), dict(state["extra"])


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch from ``seed + epoch``, so a resumed run sees the same order."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=gen).tolist())


class CheckpointManager:
    """``accelerator.save_state`` into a temp dir, marked complete, then renamed: a kill never leaves a broken latest."""

    def __init__(self, root: Path, keep: int = 2):
        self.root, self.keep = Path(root), max(1, keep)

    def complete(self) -> list[Path]:
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / COMPLETE).exists())

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, accelerator, step: int) -> Path:
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp))
        except Exception as e:
            error = self._disk_error(e, tmp)
            if error is e:
                raise
            raise error from e
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / COMPLETE).write_text(str(step))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final


    def _disk_error(self, e: Exception, tmp: Path) -> Exception:
        """The failed save's partial folder removed; the error carries the size a checkpoint needs (the last
        one's). torch and safetensors report a full disk as their own errors: with less free space than that
        size, it is raised as the OSError it is."""
        shutil.rmtree(tmp, ignore_errors=True)
        latest = self.latest()
        needed = sum(f.stat().st_size for f in latest.rglob("*") if f.is_file()) if latest else None
        if not isinstance(e, OSError):
            if needed is None or shutil.disk_usage(self.root).free >= needed:
                return e
            e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
        e.filename = e.filename or str(tmp)
        e.needed_bytes = needed
        return e


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, lines past the restored step are dropped."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        if self.path.exists():
            keep = [line for line in self.read() if line.get("step", 0) <= step]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        """The logged records; a last line cut short by a kill mid-append is dropped with a warning naming it."""
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise ValueError(f"{self.path}:{number} is not a JSON record: {line[:80]!r}") from None
                logger.warning("dropping the unfinished last line of %s (a run killed mid-write)", self.path)
        return records
