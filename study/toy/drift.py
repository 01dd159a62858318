"""The toy drift demos of Beyond Stationarity, Supplementary 11: EMA vs the NS-VQ online update on
non-stationary 2-D data (translation, expansion, shrink, split), plus every registry variant on the
same streams.

    vqgen demo drift --output-dir runs/drift

Each scenario moves the data toward a fixed target while the codebook learns online. The paper's two
rules update a raw (16, 2) codebook directly; registry variants train with Adam on
``||z_q - z||^2 + aux loss`` with the data as fixed latents. Scores are taken on the final cloud.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from stage1_tokenizer.quantizers import QUANTIZERS
from stage1_tokenizer.quantizers.search import nearest_code

from .compare import final_scores, run_variant

SCENARIOS = ("translation", "expansion", "shrink", "split")
PAPER_RULES = ("ema-online", "ns-vq-online")
M_EXPAND = ((2.5, 0.5), (0.0, 2.0))  # ||M||_2 > 1 (Suppl. 11.2 leaves M to the reader)
M_SHRINK = ((0.4, 0.1), (0.0, 0.3))  # ||M||_2 < 1


@dataclass
class DriftConfig:
    """Suppl. 11 settings (N = 1500, K = 16, r = 0.1, alpha = 0.3); tau0, lr0, batch and epochs are not given
    there and are ours."""

    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    methods: list[str] = field(default_factory=lambda: [*PAPER_RULES, *QUANTIZERS])
    num_points: int = 1500
    num_codes: int = 16
    batch_size: int = 100
    epochs: int = 20
    drift_rate: float = 0.1  # r
    alpha: float = 0.3  # EMA rate
    tau0: float = 4.0  # NS-VQ online kernel bandwidth at epoch 0, halved each epoch
    lr0: float = 0.05  # NS-VQ online step at epoch 0, times 0.9 each epoch
    adam_lr: float = 0.1  # registry variants: the data moves ~14 units in ~30 batches; 1e-2 caps codes at ~3 units
    snapshots: int = 5
    seed: int = 0

    def __post_init__(self):
        bad = [s for s in self.scenarios if s not in SCENARIOS] + [
            m for m in self.methods if m not in PAPER_RULES and m not in QUANTIZERS]
        if bad:
            raise ValueError(f"unknown scenario/method {', '.join(bad)}; scenarios: {', '.join(SCENARIOS)}; "
                             f"methods: {', '.join((*PAPER_RULES, *QUANTIZERS))}")
        if self.num_points < self.batch_size or self.epochs < 1 or self.snapshots < 2:
            raise ValueError("need num_points >= batch_size, epochs >= 1, snapshots >= 2")

    @property
    def batches_per_epoch(self) -> int:
        return self.num_points // self.batch_size


class Scenario:
    """A drifting 2-D dataset: ``batch(step)`` returns the current batch and moves the drift (Suppl. 11)."""

    def __init__(self, kind: str, cfg: DriftConfig):
        self.kind, self.cfg = kind, cfg
        self.gen = torch.Generator().manual_seed(cfg.seed)
        n = cfg.num_points
        if kind == "split":  # 11.3: X ~ N([0.5, 0.5], I), Y = X + 10 sign(X)
            self.x = torch.randn(n, 2, generator=self.gen) + 0.5
            self.y = self.x + 10 * torch.sign(self.x)
        else:
            self.x = torch.randn(n, 2, generator=self.gen)
            if kind == "translation":  # 11.1: Y = X + (10, 10)
                self.y = self.x + torch.tensor([10.0, 10.0])
            else:  # 11.2: Y = X M^T
                self.y = self.x @ torch.tensor(M_EXPAND if kind == "expansion" else M_SHRINK).T
        self.theta, self.a = torch.zeros(2), torch.eye(2)
        self.order: list[int] = []

    def _indices(self) -> torch.Tensor:
        if len(self.order) < self.cfg.batch_size:
            self.order = torch.randperm(self.cfg.num_points, generator=self.gen).tolist()
        idx, self.order = self.order[: self.cfg.batch_size], self.order[self.cfg.batch_size:]
        return torch.tensor(idx)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Points under the current drift."""
        if self.kind == "translation":
            return x + self.theta
        if self.kind == "split":
            return x + torch.sign(x) * self.theta
        return x @ self.a.T

    def batch(self, step: int) -> torch.Tensor:
        idx = self._indices()
        xb = self.transform(self.x[idx])
        r = self.cfg.drift_rate
        if self.kind in ("translation", "split"):
            self.theta = self.theta + r * (self.y[idx] - xb).mean(0)  # theta <- theta + r mean(Y_b - X_b)
        else:
            err = self.y[idx] - xb  # E = Y_b - A X_b
            self.a = self.a + r * (2 / len(idx)) * err.T @ self.x[idx]  # A <- A + r (2/B) E^T X_b
        return xb

    def cloud(self) -> torch.Tensor:
        return self.transform(self.x)


def ema_online_step(codes: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Suppl. 11.1 (1): every code with assigned points moves to ``(1 - alpha) C_k + alpha mean_k(x)``."""
    w = nearest_code(x, codes)[0]
    out = codes.clone()
    for k in w.unique():
        out[k] = (1 - alpha) * codes[k] + alpha * x[w == k].mean(0)
    return out


def ns_vq_online_step(codes: torch.Tensor, x: torch.Tensor, tau: float, lr: float) -> torch.Tensor:
    """Suppl. 11.1 (2), sample by sample: ``C_w += lr (x - C_w)``; ``C_k += lr w_k (x - C_k)`` for ``k != w``
    with ``w_k = softmax_k(-||C_k - C_w||^2 / tau)``."""
    codes = codes.clone()
    for xi in x:
        w = int(nearest_code(xi[None], codes)[0])
        weight = torch.softmax(-(codes - codes[w]).square().sum(1) / tau, dim=0)
        step = lr * weight[:, None] * (xi - codes)
        step[w] = lr * (xi - codes[w])
        codes += step
    return codes


def run_paper_rule(method: str, scenario: Scenario, cfg: DriftConfig) -> dict:
    """One of the paper's online rules on a raw N(0, 1) codebook; trajectory and final scores."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    codes = torch.randn(cfg.num_codes, 2, generator=gen)
    tau, lr = cfg.tau0, cfg.lr0
    steps = cfg.epochs * cfg.batches_per_epoch
    record = max(1, steps // 100)
    trajectory, curve = [], []
    for step in range(steps):
        x = scenario.batch(step)
        w = nearest_code(x, codes)[0]
        curve.append({"step": step, "usage": w.unique().numel() / cfg.num_codes})
        codes = ema_online_step(codes, x, cfg.alpha) if method == "ema-online" else ns_vq_online_step(codes, x, tau, lr)
        if (step + 1) % cfg.batches_per_epoch == 0:
            tau, lr = tau / 2, lr * 0.9  # after each epoch
        if step % record == 0 or step == steps - 1:
            trajectory.append(codes.tolist())
    cloud = scenario.cloud()
    idx = nearest_code(cloud, codes)[0]
    return {"curve": curve, "trajectory": trajectory, "final": final_scores(idx, codes[idx], cloud, cfg.num_codes)}


def run_method(method: str, kind: str, cfg: DriftConfig) -> dict:
    scenario = Scenario(kind, cfg)
    if method in PAPER_RULES:
        return run_paper_rule(method, scenario, cfg)
    steps = cfg.epochs * cfg.batches_per_epoch
    return run_variant(method, scenario, steps, cfg.num_codes, cfg.adam_lr, max(1, steps // 100), cfg.seed,
                       learn_encoder=False)


def plot_frames(results: dict, kind: str, cfg: DriftConfig, path: Path) -> None:
    """Rows: methods; columns: ``snapshots`` moments of training (codes as red crosses, their paths so far)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    cols = cfg.snapshots
    fig, axes = plt.subplots(len(names), cols, figsize=(2.3 * cols, 2.2 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        path_all = torch.tensor(results[name]["trajectory"])  # (T, K, 2)
        lat = torch.tensor(results[name]["final"]["latents"])
        for j, ax in enumerate(row):
            t = round(j * (len(path_all) - 1) / (cols - 1))
            ax.scatter(lat[:, 0], lat[:, 1], s=1, c="0.8")
            for k in range(path_all.shape[1]):
                ax.plot(path_all[: t + 1, k, 0], path_all[: t + 1, k, 1], lw=0.6, alpha=0.6)
            ax.scatter(path_all[t, :, 0], path_all[t, :, 1], s=12, c="red", marker="x")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
            if row is axes[0]:
                ax.set_title(f"{100 * t // max(1, len(path_all) - 1)}% of training", fontsize=8)
        f = results[name]["final"]
        row[-1].text(1.02, 0.5, f"usage {f['usage']:.0%}\nD {f['distortion']:.3f}", transform=row[-1].transAxes,
                     fontsize=7, va="center")
    fig.suptitle(f"{kind}: codebook (red) following the drifting data (grey: final cloud)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the title
    fig.savefig(path, dpi=70)
    plt.close(fig)


def run_drift_demo(cfg: DriftConfig, out_dir: str | Path) -> dict:
    """Every method on every scenario; report.md, results.json and one frames PNG per scenario."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    with tqdm(total=len(cfg.scenarios) * len(cfg.methods), desc="drift demo") as bar:
        for kind in cfg.scenarios:
            results[kind] = {}
            for method in cfg.methods:
                results[kind][method] = run_method(method, kind, cfg)
                bar.update(1)
            plot_frames(results[kind], kind, cfg, out / f"frames_{kind}.png")
    summary = {kind: {m: {k: v for k, v in r["final"].items() if k != "latents"} for m, r in res.items()}
               for kind, res in results.items()}
    (out / "results.json").write_text(json.dumps({"config": asdict(cfg), "results": summary}, indent=2))
    lines = ["# Toy drift demos (Beyond Stationarity, Suppl. 11)", "",
             f"K = {cfg.num_codes}, N = {cfg.num_points}, batch {cfg.batch_size}, {cfg.epochs} epochs, r = "
             f"{cfg.drift_rate}; EMA alpha = {cfg.alpha}; NS-VQ online tau0 = {cfg.tau0} (halved per epoch), lr0 = "
             f"{cfg.lr0} (x0.9 per epoch); registry variants: Adam lr {cfg.adam_lr} on ||z_q - z||^2 + aux loss. "
             f"Usage and distortion (mean squared quantisation error) on the final cloud; seed {cfg.seed}.", ""]
    for kind, res in summary.items():
        lines += [f"## {kind}", "", "| method | usage | perplexity | distortion |", "|---|---:|---:|---:|"]
        lines += [f"| {m} | {r['usage']:.0%} | {r['perplexity']:.2f} | {r['distortion']:.4f} |" for m, r in res.items()]
        lines += ["", f"![{kind}](frames_{kind}.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return summary

