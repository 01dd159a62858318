"""What the benchmarks share: one waited-for step of a trainer, this machine's matmul rate, the run's metadata."""
import datetime
import os
import shlex
import sys
import time

# overrides that keep a timed trainer from logging, sampling or checkpointing, and from ending
QUIET = ["train.log_every=100000", "train.sample_every=100000", "train.checkpoint_every=100000",
         "train.max_steps=100000", "train.epochs=null"]


def train_step(trainer, batches, step: int) -> None:
    """One optimisation step of a ``TrainLoop`` (schedules included), waited for by reading its loss."""
    trainer._before_step(step)
    float(trainer._step(next(batches), step)["loss"])


def machine_meta(start: float, load_start: float, **extra) -> dict:
    """Date, command, torch, threads, CPU capability and native bf16, load averages and runtime of a benchmark run."""
    import torch

    from common.runtime import native_bf16

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(),
            "command": shlex.join(["python", *sys.argv]), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_start": load_start, "load_end": os.getloadavg()[0],
            "runtime_s": time.time() - start, **extra}


SQUARE = 2048  # the square matmul that measures this machine's matmul rate, in the same process as what it judges


def square_matmul(device, dtype=None):
    """A closure doing one SQUARE x SQUARE matmul (2 SQUARE^3 FLOPs) in ``dtype`` (default fp32)."""
    import torch

    a, b = (torch.randn(SQUARE, SQUARE, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(SQUARE, SQUARE, device=device, dtype=dtype)
    return lambda: torch.mm(a, b, out=out)


def matmul_gflops(device="cpu", dtype=None, repeats: int = 5) -> float:
    """The best rate of ``repeats`` square matmuls after a warm-up, in GFLOP/s."""
    import torch

    step = square_matmul(device, dtype)
    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * SQUARE**3 / min(times) / 1e9
