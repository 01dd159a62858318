"""Turn run directories into ``report.md`` + ``results.json`` + PNG plots.

Reads only files a run leaves behind (``config.yaml``, ``metrics.jsonl``, ``eval.json``,
``samples/*.png``, and ``generation.json`` with the gFID of the priors trained on the run's codes),
so it depends on nothing else of ours. Runs of the same quantizer (e.g. seeds)
are grouped and reported as mean and standard deviation.
"""
from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import yaml

from common.atomic import write_atomic

from .leaderboard import guidance_curves, guidance_tables, leaderboard

CURVE_METRICS = ("gfid", "kid", "precision", "recall", "class_consistency")

METRICS = [  # key in eval.json, column title, direction
    ("rfid", "rFID", "lower"), ("lpips_vgg", "LPIPS (VGG)", "lower"), ("lpips_alex", "LPIPS (Alex)", "lower"),
    ("ssim", "SSIM", "higher"), ("psnr", "PSNR (dB)", "higher"), ("usage", "usage", "higher"),
    ("usage_ceiling", "usage ceiling", "higher"), ("usage_epoch", "usage (last epoch)", "higher"),
    ("perplexity", "perplexity", "higher"), ("d_per_bit", "distortion/bit", "lower"),
    ("rfid_hard", "rFID (hard codes)", "lower"), ("lpips_vgg_hard", "LPIPS VGG (hard codes)", "lower"),
    ("gpt_gfid", "gFID GPT", "lower"), ("ldm_gfid", "gFID LDM", "lower"),
    ("gpt_kid", "KID GPT", "lower"), ("ldm_kid", "KID LDM", "lower"),
    ("gpt_precision", "precision GPT", "higher"), ("ldm_precision", "precision LDM", "higher"),
    ("gpt_recall", "recall GPT", "higher"), ("ldm_recall", "recall LDM", "higher"),
    ("gpt_val_bits_per_token", "held-out bits/token GPT", "lower"),
    ("ldm_val_denoising_loss", "held-out denoising loss LDM", "lower"),
    ("usage_epoch_slope", "usage change/epoch (last 3 epochs)", "none"),
]
# per prior, from generation.json (the held-out metric each prior has)
GENERATION = ("gfid", "kid", "precision", "recall", "val_bits_per_token", "val_denoising_loss")
PRIORS = ("gpt", "ldm")
PLATEAU_EPOCHS = 3  # usage has plateaued when its epoch count moved under PLATEAU_SLOPE per epoch over these
PLATEAU_SLOPE = 0.01  # one point of the codebook per epoch


def usage_epoch_slope(curves: list[dict]) -> float | None:
    """Mean change per epoch of the codes used over each epoch, across the last ``PLATEAU_EPOCHS`` epochs: whether
    a run's usage had settled when training stopped (None with fewer epochs logged)."""
    points = [c["usage_epoch"] for c in curves if c.get("usage_epoch") is not None]
    if len(points) < PLATEAU_EPOCHS:
        return None
    return (points[-1] - points[-PLATEAU_EPOCHS]) / (PLATEAU_EPOCHS - 1)


def plateau_state(slope: float | None) -> str:
    """"plateau", "rising" or "falling" for a usage slope (fraction of the codebook per epoch); "-" without one."""
    if slope is None:
        return "-"
    return "plateau" if abs(slope) < PLATEAU_SLOPE else ("rising" if slope > 0 else "falling")


def read_run(run: Path) -> dict:
    """Everything the report needs from one run directory."""
    run = Path(run)
    cfg_file = run / "config.yaml"
    if not cfg_file.exists():
        raise ValueError(f"{run} is not a run directory (no config.yaml)")
    cfg = yaml.safe_load(cfg_file.read_text())
    metrics = run / "metrics.jsonl"
    curves = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    evaluation = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    samples = sorted((run / "samples").glob("*.png")) if (run / "samples").exists() else []
    generation = json.loads((run / "generation.json").read_text()) if (run / "generation.json").exists() else {}
    run_info = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    if (slope := usage_epoch_slope(curves)) is not None:
        evaluation["usage_epoch_slope"] = slope
    for kind, result in generation.items():
        for key in GENERATION:
            if result.get(key) is not None:
                evaluation[f"{kind}_{key}"] = result[key]
    q = cfg.get("quantizer", {})
    freeze_at = (cfg.get("schedule") or {}).get("freeze_encoder_at")
    variant = q.get("name", "?") + (f" (encoder frozen @{freeze_at})" if freeze_at is not None else "")
    own_k = evaluation.get("num_codes")  # the tokenizer's own K where it is not the configured one (fsq: prod levels)
    if own_k is not None and own_k != q.get("num_codes"):
        variant += f" ({own_k:,} codes)"
    return {"dir": str(run), "quantizer": q.get("name", "?"), "variant": variant, "freeze_at": freeze_at,
            "num_codes": q.get("num_codes"),
            "seed": cfg.get("train", {}).get("seed"), "data_fit": run_info.get("data_fit"), "curves": curves, "eval": evaluation, "generation": generation,
            "eval_grid": str(run / "eval_recon.png") if (run / "eval_recon.png").exists() else None,
            "last_sample": str(samples[-1]) if samples else None,
            "sample_grids": {k: run / g["grid"] for k, g in generation.items() if g.get("grid") and (run / g["grid"]).exists()}}


def run_label(run_dir: str | Path) -> str:
    """A run's name in file names: its folder, or the parent's for a sweep's ``<run>/tokenizer``."""
    path = Path(run_dir)
    return path.parent.name if path.name == "tokenizer" else path.name


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def group_key(run: dict, by_size: bool) -> str:
    """Runs that differ only in seed share a group: the variant (quantizer + staged schedule), and K if asked."""
    return f"{run['variant']} K={run['num_codes']}" if by_size else run["variant"]


def groups(runs: list[dict], by_size: bool) -> dict[str, list[dict]]:
    """{group_key: runs}, in the runs' order."""
    out: dict[str, list[dict]] = {}
    for r in runs:
        out.setdefault(group_key(r, by_size), []).append(r)
    return out


def summarise(runs: list[dict], by_size: bool) -> dict:
    """{group: {metric: {mean, std, n}}} with group ``variant``, or ``variant K=...`` with ``by_size``."""
    out = {}
    for key, members in groups(runs, by_size).items():
        entry = {"runs": [m["dir"] for m in members], "num_codes": members[0]["num_codes"]}
        for metric, _, _ in METRICS:
            vals = [m["eval"][metric] for m in members if m["eval"].get(metric) is not None]
            if vals:
                mu, sd = mean_std(vals)
                entry[metric] = {"mean": mu, "std": sd, "n": len(vals)}
        out[key] = entry
    return out


def _fmt(cell: dict | None) -> str:
    if not cell or math.isnan(cell["mean"]):
        return "-"
    mu, sd = cell["mean"], cell["std"]
    digits = 2 if abs(mu) >= 10 else 4
    return f"{mu:.{digits}f} ± {sd:.{digits}f}" if cell["n"] > 1 else f"{mu:.{digits}f}"


def table(summary: dict) -> str:
    cols = [m for m in METRICS if any(m[0] in e for e in summary.values())]
    arrow = {"lower": " (↓)", "higher": " (↑)"}
    head = "| quantizer | runs | " + " | ".join(f"{title}{arrow.get(d, '')}" for _, title, d in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for key, e in summary.items():
        lines.append(f"| {key} | {len(e['runs'])} | " + " | ".join(_fmt(e.get(k)) for k, _, _ in cols) + " |")
    return "\n".join(lines)


def plateau_lines(summary: dict) -> list[str]:
    """Markdown naming the variants whose codebook usage was still moving when training stopped."""
    if not any("usage_epoch_slope" in e for e in summary.values()):
        return []
    moving = {k: e["usage_epoch_slope"] for k, e in summary.items()
              if "usage_epoch_slope" in e and plateau_state(e["usage_epoch_slope"]["mean"]) != "plateau"}
    head = (f"**Usage plateau** (codes used over each epoch, change per epoch over the last {PLATEAU_EPOCHS} epochs; "
            f"a plateau moves less than {100 * PLATEAU_SLOPE:g} point of the codebook per epoch): ")
    if not moving:
        return [head + "every variant had plateaued when training stopped.", ""]
    cells = [f"{k} {plateau_state(c['mean'])} ({100 * c['mean']:+.1f}" +
             (f" ± {100 * c['std']:.1f}" if c["n"] > 1 else "") + " points/epoch)" for k, c in moving.items()]
    return [head + "still moving when training stopped: " + "; ".join(cells) +
            ". Their usage figures describe this run length, not a settled codebook.", ""]


def _plot_curves(runs: list[dict], key: str, ylabel: str, title: str, path: Path, scale: float = 1.0) -> bool:
    """One panel per codebook size, one line per variant: the mean over its seeds, shaded from min to max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in runs if any(key in c for c in r["curves"])]
    if not runs:
        return False
    sizes = sorted({r["num_codes"] for r in runs}, key=lambda k: (k is None, k))
    fig, axes = plt.subplots(1, len(sizes), figsize=(8 * len(sizes), 4.5), squeeze=False)
    for ax, k in zip(axes[0], sizes):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
        for variant, members in groups([r for r in runs if r["num_codes"] == k], by_size=False).items():
            by_step: dict[int, list[float]] = {}
            for r in members:
                for c in r["curves"]:
                    if key in c:
                        by_step.setdefault(c["step"], []).append(scale * c[key])
            steps = sorted(by_step)
            line, = ax.plot(steps, [statistics.fmean(by_step[t]) for t in steps], lw=1.1,
                            marker="o" if len(steps) < 50 else None, ms=3,  # sparse curves (per epoch) show points
                            label=variant + (f" ({len(members)} seeds)" if len(members) > 1 else ""))
            if len(members) > 1:
                ax.fill_between(steps, [min(by_step[t]) for t in steps], [max(by_step[t]) for t in steps],
                                color=line.get_color(), alpha=0.15, lw=0)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(title + (f", K = {k}" if k else ""))
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_bars(summary: dict, metric: str, title: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, e in summary.items() if metric in e]
    if not keys:
        return False
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(keys) + 2), 3.8))
    means = [summary[k][metric]["mean"] for k in keys]
    stds = [summary[k][metric]["std"] for k in keys]
    ax.bar(range(len(keys)), means, yerr=stds, capsize=3, color="tab:blue")
    ax.set_xticks(range(len(keys)), keys, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel(title)
    ax.set_title(f"{title} per quantizer (error bars: std over runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_histograms(runs: list[dict], by_size: bool, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_counts = [_first(members) for members in groups(runs, by_size).values()]
    with_counts = [r for r in with_counts if r["eval"].get("code_counts")]
    if not with_counts:
        return False
    cols = min(4, len(with_counts))
    rows = math.ceil(len(with_counts) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False)
    for ax, r in zip(axes.flat, with_counts):
        counts = sorted(r["eval"]["code_counts"], reverse=True)
        total = sum(counts) or 1
        ax.bar(range(len(counts)), [c / total for c in counts], width=1.0, color="tab:green")
        ax.set_yscale("log")
        ax.set_title(f"{group_key(r, by_size)} (usage {r['eval'].get('usage', float('nan')):.0%})", fontsize=8)
        ax.set_xlabel("code rank")
        ax.set_ylabel("frequency")
    for ax in list(axes.flat)[len(with_counts):]:
        ax.axis("off")
    fig.suptitle("Code frequencies on the evaluation set, sorted (first seed of each variant)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_guidance(curves: dict[str, dict], kind: str, path: Path) -> bool:
    """gFID (left) and precision, recall and class consistency (right) against the guidance scale, per variant
    (``curves``: one prior's, from ``guidance_curves``)."""
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, points in curves.items():
        scales = list(points)
        mean = lambda name: [statistics.fmean(p[name] for p in points[s]) if all(p.get(name) is not None  # noqa: E731
                                                                                   for p in points[s]) else float("nan")
                             for s in scales]
        line = left.plot(scales, mean("gfid"), marker="o", label=key)[0]
        for name, style in (("precision", "-"), ("recall", "--"), ("class_consistency", ":")):
            right.plot(scales, mean(name), style, marker=".", color=line.get_color(), label=f"{key} {name}")
    left.set(xlabel="guidance scale", ylabel="gFID", title=f"{kind.upper()}: gFID")
    right.set(xlabel="guidance scale", ylabel="fraction", title="precision (-), recall (--), class consistency (:)")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _first(members: list[dict]) -> dict:
    """The run of a group whose grids the report shows: the lowest seed."""
    return min(members, key=lambda r: (r["seed"] is None, r["seed"] or 0))


def _shown(src: Path, out: Path, name: str) -> str:
    """A grid's link in report.md: in place when it lies inside the report's folder (an archive under it),
    else copied to ``grids/`` so the report travels on its own."""
    src = src.resolve()
    if src.is_relative_to(out.resolve()):
        return src.relative_to(out.resolve()).as_posix()
    (out / "grids").mkdir(exist_ok=True)
    shutil.copyfile(src, out / "grids" / name)
    return f"grids/{name}"


def nested(summary: dict) -> dict:
    """results.json layout: each prior's metrics under its own key (``"gpt": {"gfid": ..., "kid": ...}``)."""
    out = {}
    for key, entry in summary.items():
        entry = dict(entry)
        for kind in PRIORS:
            moved = {m: entry.pop(f"{kind}_{m}") for m in GENERATION if f"{kind}_{m}" in entry}
            if moved:
                entry[kind] = moved
        out[key] = entry
    return out


def _curve_entry(scale: float, points: list[dict]) -> dict:
    """results.json's guidance-curve point: each metric's mean and std over the seeds' points at ``scale``."""
    out = {"guidance_scale": scale}
    for metric in CURVE_METRICS:
        values = [p[metric] for p in points if p.get(metric) is not None]  # no classifier: no class consistency
        if values:
            mean, std = mean_std(values)
            out[metric] = {"mean": mean, "std": std, "n": len(values)}
    return out


def write_report(run_dirs: list[str | Path], out_dir: str | Path, title: str = "Tokenizer comparison",
                 failures: dict[str, str] | None = None, notes: list[str] | None = None,
                 not_comparable: str | None = None) -> dict:
    """Write report.md, results.json and plots for ``run_dirs`` into ``out_dir``; returns the summary.

    ``failures`` ({name: error}) are listed in both files; ``notes`` are lines placed under the title;
    ``not_comparable`` (why, e.g. a smoke run) goes into results.json as ``"not_comparable"``.
    """
    failures = failures or {}
    if not run_dirs and not failures:
        raise ValueError("no run directories given")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [read_run(Path(d)) for d in run_dirs]
    by_size = len({r["num_codes"] for r in runs}) > 1  # name groups by K only when sizes differ
    summary = summarise(runs, by_size)
    plots = []
    for name, key, ylabel, scale in (("usage_curves.png", "usage", "codes used in batch (%)", 100.0),
                                     ("usage_epoch_curves.png", "usage_epoch", "codes used over the epoch (%)", 100.0),
                                     ("perplexity_curves.png", "perplexity", "batch perplexity", 1.0),
                                     ("loss_curves.png", "loss", "training loss", 1.0),
                                     ("drift_curves.png", "drift", "encoder drift per step", 1.0)):
        if _plot_curves(runs, key, ylabel, f"{ylabel} during training", out / name, scale):
            plots.append(name)
    for metric, label in (("rfid", "rFID"), ("usage", "codebook usage"), ("lpips_vgg", "LPIPS (VGG)"),
                          ("gpt_gfid", "gFID (GPT prior)"), ("ldm_gfid", "gFID (LDM prior)")):
        if _plot_bars(summary, metric, label, out / f"{metric}_per_quantizer.png"):
            plots.append(f"{metric}_per_quantizer.png")
    if _plot_histograms(runs, by_size, out / "code_frequencies.png"):
        plots.append("code_frequencies.png")
    grouped = groups(runs, by_size)
    curves = guidance_curves(grouped, PRIORS)
    for kind, prior_curves in curves.items():
        if _plot_guidance(prior_curves, kind, out / f"guidance_{kind}.png"):
            plots.append(f"guidance_{kind}.png")
    grids, samples = [], []
    for key, members in grouped.items():  # one run per variant (and K): the first seed
        r = _first(members)
        src = r["eval_grid"] or r["last_sample"]
        if src:
            grids.append((key, _shown(Path(src), out, f"{run_label(r['dir'])}.png")))
        for kind, src in sorted(r["sample_grids"].items()):
            samples.append((f"{key} / {kind}", _shown(Path(src), out, f"{run_label(r['dir'])}-{kind}.png")))
    inputs = dict.fromkeys(r["data_fit"]["message"] for r in runs if r.get("data_fit"))  # each distinct once
    text = [f"# {title}", "", *(notes or []), *(f"Input: {line}" for line in inputs), *([""] if inputs else []),
            *leaderboard(grouped, PRIORS), *guidance_tables(curves),
            f"{len(runs)} run(s). Mean ± std over runs of the same variant (seeds); grids show the first seed.", "",
            table(summary) if runs else "(no finished runs)", "", *plateau_lines(summary)]
    if failures:
        text += ["## Failed", "", *(f"- **{name}**: {error}" for name, error in failures.items()), ""]
    text += [f"![{p}]({p})" for p in plots]
    if grids:
        text += ["", "## Reconstructions (top: original, below: reconstruction)", ""]
        text += [f"**{q}**\n\n![{q}]({g})\n" for q, g in grids]
    if samples:
        text += ["", "## Samples of the priors", ""]
        text += [f"**{q}**\n\n![{q}]({g})\n" for q, g in samples]
    write_atomic(out / "report.md", "\n".join(text) + "\n")
    results = nested(summary)
    for kind, prior_curves in curves.items():  # each prior's guidance curve, mean ± std over seeds
        for key, points in prior_curves.items():
            results[key].setdefault(kind, {})["guidance_curve"] = [_curve_entry(s, pts) for s, pts in points.items()]
    results.update({name: {"error": error} for name, error in failures.items()})
    if not_comparable:
        results["not_comparable"] = not_comparable
    write_atomic(out / "results.json", json.dumps(results, indent=2))
    return summary
