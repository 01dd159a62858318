"""Experiment tracking through accelerate's trackers: ``report_to`` = tensorboard | wandb | all | none.

Every training stage logs what it writes to ``metrics.jsonl`` (losses, lr, usage, perplexity, replacements,
drift) plus its sample / reconstruction grids, as one tracker run per stage named ``train.run_name``.
TensorBoard writes under ``<run dir>/logs/<run name>``; wandb runs offline unless ``WANDB_MODE`` says otherwise.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
from PIL import Image

TRACKERS = ("tensorboard", "wandb")
CHOICES = (*TRACKERS, "all", "none")
INSTALL = {"tensorboard": "pip install 'vqgen[tracking]' (or tensorboard)", "wandb": "pip install wandb"}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def trackers_for(report_to: str) -> list[str]:
    """The accelerate tracker names ``report_to`` asks for; a clear error for unknown or uninstalled ones."""
    if report_to not in CHOICES:
        raise ValueError(f"unknown report_to {report_to!r}; choose one of {', '.join(CHOICES)}")
    if report_to == "none":
        return []
    if report_to == "all":
        found = [t for t in TRACKERS if _installed(t)]
        if not found:
            raise ValueError(f"report_to=all found no tracker installed; {INSTALL['tensorboard']}")
        return found
    if not _installed(report_to):
        raise ValueError(f"report_to={report_to} needs the {report_to} package: {INSTALL[report_to]}")
    return [report_to]


def tracker_kwargs(names: list[str], run_name: str, run_dir: Path, resume_step: int) -> dict:
    """Per-tracker init kwargs: a resumed TensorBoard run purges events past its checkpoint; wandb offline."""
    kwargs = {}
    if "tensorboard" in names and resume_step:
        kwargs["tensorboard"] = {"purge_step": resume_step + 1}
    if "wandb" in names:
        kwargs["wandb"] = {"name": run_name, "dir": str(run_dir), "mode": os.environ.get("WANDB_MODE", "offline"),
                           "resume": "allow"}
    return kwargs


def flat_config(cfg: dict, prefix: str = "") -> dict:
    """A nested config as ``{"train.lr": 5e-4, ...}`` with lists as strings: hyper-parameters trackers accept."""
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = "none" if value is None else value
        else:
            out[name] = str(value)
    return out


def scalars(logs: dict) -> dict:
    """The numeric entries of a log record (flags as 0/1)."""
    return {k: float(v) for k, v in logs.items() if isinstance(v, (bool, int, float)) and np.isfinite(float(v))}


def log_images(trackers, images: dict[str, Path], step: int) -> None:
    """PNG grids to every tracker that takes images, in each one's own format."""
    if not images:
        return
    arrays = {name: np.asarray(Image.open(path).convert("RGB")) for name, path in images.items()}
    for tracker in trackers:
        if tracker.name == "tensorboard":
            for name, array in arrays.items():
                tracker.writer.add_image(name, array, global_step=step, dataformats="HWC")
        elif tracker.name == "wandb":
            tracker.log_images({name: [array] for name, array in arrays.items()}, step=step)
