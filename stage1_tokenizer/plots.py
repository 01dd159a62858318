"""Stage-1 training pictures: reconstruction grids, codebook usage, drift and the kernel regime."""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import save_image


def save_recon_grid(originals: torch.Tensor, recons: torch.Tensor, path: Path) -> None:
    """Originals on odd rows, reconstructions below them; images in [-1, 1]."""
    n = min(8, len(originals))
    rows = []
    for start in range(0, len(originals), n):
        rows += [originals[start:start + n], recons[start:start + n]]
    grid = torch.cat(rows).float().clamp(-1, 1) * 0.5 + 0.5
    save_image(grid, path, nrow=n, padding=1)


def plot_usage(records: list[dict], path: Path, title: str) -> None:
    """Batch usage (%) and perplexity over steps, from metrics.jsonl records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if "usage" in r]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, ax1 = plt.subplots(figsize=(7, 3.5))
    ax1.plot(steps, [100 * r["usage"] for r in rows], color="tab:blue", label="usage")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("codes used in batch (%)", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(steps, [r["perplexity"] for r in rows], color="tab:orange", label="perplexity")
    ax2.set_ylabel("batch perplexity (codes)", color="tab:orange")
    totals = [r.get("replaced_total", 0) for r in rows]  # logged every few steps: mark where the total grew
    replaced = [r["step"] for r, before, after in zip(rows[1:], totals, totals[1:]) if after > before]
    for s in replaced:
        ax1.axvline(s, color="0.8", lw=0.6, zorder=0)
    ax1.set_title(title + (" (grey lines: code replacements)" if replaced else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_drift(records: list[dict], path: Path, title: str) -> None:
    """Encoder drift per step on the fixed probe batch, with frozen-encoder steps shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if "drift" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([r["step"] for r in rows], [r["drift"] for r in rows], color="tab:purple")
    frozen = [r["step"] for r in records if r.get("frozen_encoder")]
    if frozen:
        ax.axvspan(min(frozen), max(frozen), color="tab:blue", alpha=0.1, label="encoder frozen")
        ax.legend()
    ax.set_xlabel("training step")
    ax.set_ylabel("mean ||z_t - z_prev|| per step")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_kernel_regime(records: list[dict], path: Path, title: str) -> bool:
    """NS-VQ's kernel regime over steps: mean non-winner weight sum (``lambda (K-1)`` when the kernel is uniform)
    and the codes' spread over the latents' (near 0: codes collapsed onto the latents' mean), beside usage."""
    rows = [r for r in records if "nonwinner_weight" in r]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, label in ((axes[0], "nonwinner_weight", "non-winner weight sum per latent"),
                           (axes[1], "spread_ratio", "code spread / latent spread"),
                           (axes[2], "usage", "codes used in batch (%)")):
        values = [r[key] * (100 if key == "usage" else 1) for r in rows if key in r]
        ax.plot(steps[: len(values)], values)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
