"""Pictures every training stage draws: held-out against training curves."""
from __future__ import annotations

from pathlib import Path


def plot_validation(records: list[dict], metric: str, path: Path, title: str) -> None:
    """Held-out and training ``metric`` (same protocol, fixed examples) over steps, the raw batch loss faint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if f"val_{metric}" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r[f"train_{metric}"] for r in rows], "o-", color="tab:blue", ms=3, label="train (fixed subset)")
    ax.plot(steps, [r[f"val_{metric}"] for r in rows], "o-", color="tab:red", ms=3, label="held out")
    best = min(rows, key=lambda r: r[f"val_{metric}"])
    ax.axvline(best["step"], color="0.7", lw=0.8, ls="--", label=f"best held out ({best[f'val_{metric}']:.4g})")
    ax.set_xlabel("training step")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
