"""Where `make demo` spends its compute: one training step of each stage and Inception's feature pass, as achieved
GFLOP/s against this machine's matmul rate measured in the same run.

    python benchmarks/bench_profile.py     # -> benchmarks/results/profile.{json,md}

The demo's settings (the `demo` sweep: the `mnist` tokenizer with LPIPS on 8 images a batch, the `tiny` GPT and
LDM in the demo's precision) on bundled MNIST. Each stage: one step under torch's FLOP counter (not timed), then
``--steps`` timed steps (median); the tokenizer's step is also split into its parts (the batch's loading, LPIPS
forward + backward alone), each timed as often. Inception: the FLOPs of one 299-px image, counted on torchvision's
Inception-v3 graph (the FID network is its TF port: the same convolutions), the network's images/s at the CPU
batch, and ``extract_features`` on 32-px tensors (clean resize included). The rate: the best 2048 x 2048 matmul in
fp32 (and in bf16 where the CPU runs it natively) timed before and after the stages; a stage in bf16 is judged
against the bf16 rate. Side by side on one trainer, alternated: the priors' attention kernels (torch's fused SDPA
against the explicit form used on a CPU) and torch's deterministic kernels (every training run's) against its
free choice.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from harness import QUIET, machine_meta, matmul_gflops, train_step  # benchmarks/ is on the path of a script run from it

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def timed(fn, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def counted(fn) -> int:
    """FLOPs of one call of ``fn`` (forward and backward), by torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def stage_row(name: str, trainer, steps: int) -> dict:
    """FLOPs and median seconds of one optimisation step of ``trainer``."""
    batches = trainer._epoch_iter(0)
    flops = counted(lambda: train_step(trainer, batches, 0))
    step = iter(range(1, 10**6))
    times = timed(lambda: train_step(trainer, batches, next(step)), steps)
    return {"stage": name, "flops": flops, "median_s": statistics.median(times), "batch": trainer.cfg.train.batch_size,
            "precision": trainer.acc.mixed_precision}


def side_by_side(name: str, trainer, steps: int, variants: dict, rounds: int = 2) -> dict:
    """Median step under each of ``variants`` ({label: function switching to it}), alternated ``rounds`` times on
    one trainer, so both see the same machine; the first label is the baseline of ``speedup``."""
    batches, step = trainer._epoch_iter(0), iter(range(10**6))
    times = {label: [] for label in variants}
    for _ in range(rounds):
        for label, switch in variants.items():
            switch()
            times[label] += timed(lambda: train_step(trainer, batches, next(step)), steps)
    medians = {f"{label}_s": statistics.median(t) for label, t in times.items()}
    base, other = medians.values()
    return {"stage": name, **medians, "speedup": base / other}


def attention_ratio(name: str, trainer, steps: int) -> dict:
    """torch's fused attention against the explicit form the priors use on a CPU (``fit_attention(model,
    "cuda")`` selects the fused kernel on any device)."""
    from stage2_prior.attention import fit_attention

    model = trainer.unwrapped
    row = side_by_side(name, trainer, steps, {"fused": lambda: fit_attention(model, "cuda"),
                                              "explicit": lambda: fit_attention(model, "cpu")})
    fit_attention(model, trainer.acc.device)
    return row


def determinism_ratio(name: str, trainer, steps: int) -> dict:
    """torch's free kernel choice against the deterministic kernels every training run uses."""
    import torch

    row = side_by_side(name, trainer, steps, {"free": lambda: torch.use_deterministic_algorithms(False),
                                              "deterministic": lambda: torch.use_deterministic_algorithms(True,
                                                                                                           warn_only=True)})
    torch.use_deterministic_algorithms(True, warn_only=True)
    return row


def tokenizer_parts(trainer, steps: int) -> list[dict]:
    """The tokenizer step's parts: loading a batch, and LPIPS forward + backward on the images the loss scores."""
    batches = trainer._epoch_iter(0)
    load = timed(lambda: next(batches), steps)
    x = next(batches)[0]
    n = trainer.cfg.loss.lpips_images or len(x)
    recon = x[:n].clone().requires_grad_(True)

    def lpips():
        trainer.lpips(recon, x[:n]).mean().backward()

    rows = [{"stage": "tokenizer: batch loading", "flops": 0, "median_s": statistics.median(load), "batch": len(x)}]
    if trainer.lpips is not None:
        rows.append({"stage": f"tokenizer: LPIPS fwd+bwd ({n} images)", "flops": counted(lpips),
                     "median_s": statistics.median(timed(lpips, steps)), "batch": n})
    return rows


def inception_rows(repeats: int) -> list[dict]:
    """Inception-v3 to pool3: counted FLOPs of an image, the network's images/s, and extract_features' on tensors."""
    import torch
    import torchvision

    from eval.fid import default_batch_size, extract_features
    from eval.inception import load_inception

    graph = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
    graph.fc = torch.nn.Identity()  # pool3 features, as the FID network returns
    with torch.inference_mode():
        per_image = counted(lambda: graph(torch.rand(1, 3, 299, 299)))
    batch = default_batch_size("cpu")
    net = load_inception("cpu")
    x = torch.rand(batch, 3, 299, 299).mul_(255).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        net_s = statistics.median(timed(lambda: net(x), repeats))
    images = (torch.rand(64, 1, 32, 32) * 255).to(torch.uint8)
    pass_s = statistics.median(timed(lambda: extract_features(images, progress=False), max(1, repeats // 4)))
    return [{"stage": "Inception network (FID features)", "flops": per_image * batch, "median_s": net_s, "batch": batch},
            {"stage": "extract_features, 32-px tensors (resize included)", "flops": per_image * 64,
             "median_s": pass_s, "batch": 64}]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed steps (or passes) per row")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "profile"))
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    import torch

    from common.config_loader import with_overrides
    from common.runtime import native_bf16
    from stage1_tokenizer.config import load_tokenizer_config
    from stage1_tokenizer.train import TokenizerTrainer, train_tokenizer
    from stage2_prior.config import load_prior_config
    from stage2_prior.train import TRAINERS
    from study.sweep import load_sweep_config

    start, load_start = time.time(), os.getloadavg()[0]
    demo = load_sweep_config("demo")
    bf16 = native_bf16()
    rates = {"fp32": [matmul_gflops()], **({"bf16": [matmul_gflops(dtype=torch.bfloat16)]} if bf16 else {})}
    rows, attention, determinism = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tok_cfg = with_overrides(load_tokenizer_config(demo.preset, list(demo.tokenizer)),
                                 ["data.num_images=4096", "data.num_workers=0", *QUIET])
        trainer = TokenizerTrainer(tok_cfg, os.path.join(tmp, "profiled"))
        rows.append(stage_row("tokenizer step (MSE + LPIPS)", trainer, args.steps))
        determinism.append(determinism_ratio("tokenizer step", trainer, args.steps))
        rows += tokenizer_parts(trainer, args.steps)
        del trainer
        tok = os.path.join(tmp, "tok")
        train_tokenizer(with_overrides(tok_cfg, ["train.max_steps=2", "train.batch_size=8"]), tok)
        for kind, preset, overrides in (("gpt", demo.gpt_preset, demo.gpt), ("ldm", demo.ldm_preset, demo.ldm)):
            cfg = load_prior_config(kind, preset, [*overrides, f"tokenizer={tok}", "num_images=4096",
                                                   "train.val_fraction=0", *QUIET])
            trainer = TRAINERS[kind](cfg, os.path.join(tmp, kind))
            rows.append(stage_row(f"{kind.upper()} step", trainer, args.steps))
            attention.append(attention_ratio(f"{kind.upper()} step", trainer, args.steps))
            determinism.append(determinism_ratio(f"{kind.upper()} step", trainer, args.steps))
        rows += inception_rows(args.steps)
    rates["fp32"].append(matmul_gflops())
    if bf16:
        rates["bf16"].append(matmul_gflops(dtype=torch.bfloat16))
    best = {k: max(v) for k, v in rates.items()}
    for r in rows:
        rate = best["bf16"] if r.get("precision") == "bf16" else best["fp32"]
        r["gflops"] = r["flops"] / r["median_s"] / 1e9
        r["of_matmul"] = r["gflops"] / rate
    meta = machine_meta(start, load_start, matmul_gflops=rates)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, results=rows, attention=attention, determinism=determinism), f, indent=1)
    rate_text = ", ".join(f"{k} {min(v):.0f}-{max(v):.0f} GFLOP/s" for k, v in rates.items())
    lines = ["# Where the demo's compute goes: one step of each stage and Inception, against the matmul rate", "",
             f"- Date: {meta['date']}; command: `{meta['command']}`; torch {meta['torch']}, {meta['threads']} threads; "
             f"CPU capability {meta['cpu_capability']}, native bf16: {meta['native_bf16']}; 1-min load "
             f"{load_start:.2f} at start, {meta['load_end']:.2f} at end; runtime {meta['runtime_s']:.0f} s.",
             f"- 2048 x 2048 matmul, before and after the stages: {rate_text}. `of matmul` = achieved GFLOP/s over the "
             "best matmul rate of the precision the row runs in (bf16 rows against bf16).",
             "- FLOPs by torch's counter (matmuls and convolutions, forward + backward); seconds: median of "
             f"{args.steps} after a warm-up.", "",
             "| what | batch | precision | GFLOP | ms | GFLOP/s | of matmul |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['batch']} | {r.get('precision', 'fp32')} | {r['flops'] / 1e9:.1f} | "
                     f"{1e3 * r['median_s']:.1f} | {r['gflops']:.1f} | {100 * r['of_matmul']:.0f}% |")
    lines += ["", "Attention kernel on this CPU, side by side (the same trainer, alternated; median step):", "",
              "| stage | fused SDPA ms | explicit ms | speed-up of explicit |", "|---|---:|---:|---:|"]
    lines += [f"| {a['stage']} | {1e3 * a['fused_s']:.1f} | {1e3 * a['explicit_s']:.1f} | {a['speedup']:.2f}x |"
              for a in attention]
    lines += ["", "Deterministic kernels (every training run's setting) against torch's free choice, side by side:", "",
              "| stage | free ms | deterministic ms | speed-up of deterministic |", "|---|---:|---:|---:|"]
    lines += [f"| {d['stage']} | {1e3 * d['free_s']:.1f} | {1e3 * d['deterministic_s']:.1f} | {d['speedup']:.2f}x |"
              for d in determinism]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
