"""A quantizer comparison on a drifting 2-D stream (after Beyond Stationarity, Suppl. 11).

Each variant sits between a learnable linear encoder and decoder (both start as the identity)
and is trained online on batches ``X[idx] + theta`` whose offset ``theta`` is pulled toward a
moving target at ``drift_rate`` per batch. The run records codebook trajectories, batch usage and
distortion, then scores every variant on the final distribution.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from eval.codebook import distortion_per_bit, perplexity, usage
from stage1_tokenizer.quantizers import QUANTIZERS, build_quantizer
from stage1_tokenizer.quantizers.stats import code_counts

TARGETS = ((0.0, 0.0), (4.0, 0.0), (4.0, 4.0))  # the offset the stream drifts toward, stage by stage


@dataclass
class ToyConfig:
    quantizers: list[str] = field(default_factory=lambda: list(QUANTIZERS))
    num_codes: int = 16
    steps: int = 600
    batch_size: int = 256
    lr: float = 1e-2
    drift_rate: float = 0.1
    record_every: int = 10
    seed: int = 0

    def __post_init__(self):
        unknown = [q for q in self.quantizers if q not in QUANTIZERS]
        if unknown:
            raise ValueError(f"unknown quantizer(s) {', '.join(unknown)}; valid: {', '.join(QUANTIZERS)}")
        if self.steps < 1 or self.batch_size < 1 or self.num_codes < 2:
            raise ValueError("steps and batch_size must be >= 1 and num_codes >= 2")


def base_points(n: int, gen: torch.Generator) -> torch.Tensor:
    """Four anisotropic Gaussian blobs in the plane."""
    centres = torch.tensor([[-1.5, -1.0], [1.5, -1.0], [0.0, 1.5], [0.0, -0.2]])
    which = torch.randint(len(centres), (n,), generator=gen)
    return centres[which] + torch.randn(n, 2, generator=gen) * torch.tensor([0.45, 0.25])


class DriftingStream:
    """Batches ``X[idx] + theta``; ``theta <- theta + rate (target - theta)`` each batch."""

    def __init__(self, cfg: ToyConfig, gen: torch.Generator):
        self.cfg, self.gen = cfg, gen
        self.points = base_points(8192, gen)
        self.theta = torch.zeros(2)

    def target(self, step: int) -> torch.Tensor:
        stage = min(len(TARGETS) - 1, step * len(TARGETS) // self.cfg.steps)
        return torch.tensor(TARGETS[stage])

    def batch(self, step: int) -> torch.Tensor:
        self.theta += self.cfg.drift_rate * (self.target(step) - self.theta)
        idx = torch.randint(len(self.points), (self.cfg.batch_size,), generator=self.gen)
        return self.points[idx] + self.theta

    def cloud(self) -> torch.Tensor:
        """Fresh points from the current distribution, for the final scores."""
        return base_points(8192, self.gen) + self.theta


def _as_map(x: torch.Tensor) -> torch.Tensor:
    return x.T.reshape(1, 2, 1, -1)  # N latents as a (1, D, 1, N) latent map


def _codes_2d(q) -> torch.Tensor:
    e = q.effective_codebook().detach()
    return e[0] if e.dim() == 3 else e  # rvq: its first depth


def run_variant(name: str, stream, steps: int, num_codes: int, lr: float, record_every: int = 10, seed: int = 0,
                learn_encoder: bool = True) -> dict:
    """Train one variant online on ``stream`` (``batch(step)``, ``cloud()``) between linear maps that start as the
    identity (learnable when ``learn_encoder``, else fixed); return curves, code trajectory and final scores."""
    torch.manual_seed(seed)
    options = {"warmup": steps // 10} if name.startswith("sf-") else {}
    if name == "fsq":  # a 2-D toy: the grid is L x L, its own coordinates
        side = math.isqrt(num_codes)
        if side * side != num_codes or side < 3:
            raise ValueError(f"the 2-D toy's fsq grid is L x L (L >= 3): num_codes must be a square such as 16; got {num_codes}")
        options["levels"] = [side, side]
    q = build_quantizer(name, num_codes, 2, **options)
    enc, dec = nn.Linear(2, 2), nn.Linear(2, 2)
    for layer in (enc, dec):
        nn.init.eye_(layer.weight)
        nn.init.zeros_(layer.bias)
        layer.requires_grad_(learn_encoder)
    params = [p for m in (q, enc, dec) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if params else None  # EMA with a fixed encoder learns by statistics only
    curve, trajectory = [], []
    for step in range(steps):
        x = stream.batch(step)
        out = q(_as_map(enc(x)))
        recon = dec(out.quantized.reshape(2, -1).T)
        loss = (recon - x).square().mean() + out.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: loss became {loss.item()} at step {step}")
        if opt is not None and loss.requires_grad:  # not during SF-DiVeQ's warm-up with a fixed encoder
            opt.zero_grad()
            loss.backward()
            opt.step()
        curve.append({"step": step, "usage": float(out.stats["usage"]), "perplexity": float(out.stats["perplexity"]),
                      "loss": loss.item()})
        if step % record_every == 0 or step == steps - 1:
            with torch.no_grad():
                trajectory.append(_codes_2d(q).tolist())
    q.eval()
    with torch.no_grad():
        x = stream.cloud()
        z = _as_map(enc(x))
        out = q(z)
        final = final_scores(out.indices.reshape(-1), out.quantized.reshape(2, -1).T, z.reshape(2, -1).T, num_codes)
        final["recon_mse"] = (dec(out.quantized.reshape(2, -1).T) - x).square().mean().item()
    return {"curve": curve, "trajectory": trajectory, "final": final}


def final_scores(indices: torch.Tensor, quantized: torch.Tensor, latents: torch.Tensor, num_codes: int) -> dict:
    """Usage, perplexity, distortion (mean squared quantisation error) and distortion per bit on flat (N, 2) points."""
    counts = code_counts(indices, num_codes)
    distortion = (quantized - latents).square().sum(1).mean().item()
    return {"usage": usage(counts), "perplexity": perplexity(counts), "distortion": distortion,
            "distortion_per_bit": distortion_per_bit(distortion, counts), "latents": latents[:1500].tolist()}


def plot(results: dict, out_dir: Path) -> None:
    """codebooks.png (trajectories over the final latents) and usage.png (batch usage over steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    cols = min(5, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        r = results[name]
        lat = torch.tensor(r["final"]["latents"])
        ax.scatter(lat[:, 0], lat[:, 1], s=2, c="0.75", label="final latents")
        if r["trajectory"]:
            path = torch.tensor(r["trajectory"])  # (T, K, 2)
            for k in range(path.shape[1]):
                ax.plot(path[:, k, 0], path[:, k, 1], lw=0.7, alpha=0.6)
            ax.scatter(path[-1, :, 0], path[-1, :, 1], s=14, c="red", marker="x", label="final codes")
        f = r["final"]
        ax.set_title(f"{name}\nusage {f['usage']:.0%}, distortion {f['distortion']:.3f}", fontsize=9)
        ax.set_xlabel("latent dim 1")
        ax.set_ylabel("latent dim 2")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("Codebook trajectories on a drifting 2-D stream (lines: code paths over training)")
    fig.tight_layout()
    fig.savefig(out_dir / "codebooks.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors[: len(names)])
    for name in names:
        u = torch.tensor([c["usage"] for c in results[name]["curve"]])
        smooth = torch.nn.functional.avg_pool1d(u[None, None], 21, 1, 10, count_include_pad=False)[0, 0]
        ax.plot(smooth * 100, label=name, lw=1.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("codes used in batch (%)")
    ax.set_title("Batch codebook usage while the data drifts (moving average over 21 steps)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "usage.png", dpi=110)
    plt.close(fig)


def write_report(results: dict, cfg: ToyConfig, out_dir: Path) -> str:
    lines = ["| quantizer | usage | perplexity | distortion | distortion/bit | recon MSE |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        f = r["final"]
        lines.append(f"| {name} | {f['usage']:.0%} | {f['perplexity']:.2f} | {f['distortion']:.4f} | "
                     f"{f['distortion_per_bit']:.4f} | {f['recon_mse']:.4f} |")
    table = "\n".join(lines)
    text = (f"# Quantizer comparison on a drifting 2-D stream\n\nK = {cfg.num_codes}, {cfg.steps} steps, batch "
            f"{cfg.batch_size}, Adam lr {cfg.lr}, drift rate {cfg.drift_rate}, seed {cfg.seed}. Scores on the "
            f"final distribution, eval mode.\n\n{table}\n\n![codebooks](codebooks.png)\n\n![usage](usage.png)\n")
    (out_dir / "report.md").write_text(text)
    summary = {name: {k: v for k, v in r["final"].items() if k != "latents"} for name, r in results.items()}
    (out_dir / "results.json").write_text(json.dumps({"config": asdict(cfg), "results": summary}, indent=2))
    return table


def compare(cfg: ToyConfig, out_dir: str | Path) -> dict:
    """Run every requested variant, write report.md, results.json, codebooks.png and usage.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in tqdm(cfg.quantizers, desc="quantizers"):
        stream = DriftingStream(cfg, torch.Generator().manual_seed(cfg.seed))
        results[name] = run_variant(name, stream, cfg.steps, cfg.num_codes, cfg.lr, cfg.record_every, cfg.seed)
    plot(results, out)
    print(write_report(results, cfg, out))
    return results
