"""What the training-step benchmarks share: one waited-for step of a trainer, and the run's machine metadata."""
import datetime
import os
import shlex
import sys
import time


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
