"""Paper-scale presets at their configured batch size: seconds per training step, peak memory, FLOPs per step.

    python benchmarks/bench_presets.py     # -> benchmarks/results/presets.{json,md}

On a GPU (the device check runs it there) the steps and peak memory are the GPU's. Each row runs in a fresh process (this file with --worker) on synthetic 256x256 colour images: a tokenizer preset
(its discriminator switched on from step 0, so its cost is in the step), or a prior preset on the 16x16 codes of a
2-step `vqgan-f16` tokenizer. A process whose resident memory passes ``--memory-gib`` is stopped and the row runs
again at half the batch, so the machine's own out-of-memory killer never has to choose; the table says which batch ran.
The timed process runs one step under torch's FLOP counter (not timed) and then ``--steps`` timed steps. The GPU
column is an estimate: the counted FLOPs at an assumed ``--mfu`` of an H100's dense bf16 rate.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from harness import QUIET, machine_meta, train_step  # benchmarks/ is on the path of a script run from it

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
H100_BF16_FLOPS = 989e12  # dense bf16, SXM
ROWS = [("tokenizer", "celeba-hq"), ("tokenizer", "vqgan-f16"), ("tokenizer", "nsvq2026"),
        ("gpt", "celeba-hq"), ("gpt", "afhq"), ("ldm", "celeba-hq")]


def _trainer(cfg):
    from stage1_tokenizer.config import load_tokenizer_config
    from stage1_tokenizer.train import TokenizerTrainer
    from stage2_prior.config import load_prior_config
    from stage2_prior.train import TRAINERS

    extra = [*QUIET, *([f"train.batch_size={cfg['batch']}"] if cfg.get("batch") else [])]
    out = os.path.join(cfg["tmp"], f"{cfg['stage']}-{cfg['preset']}-{cfg.get('batch')}-{time.time_ns()}")
    if cfg["stage"] == "tokenizer":
        tok = load_tokenizer_config(cfg["preset"], [f"data.source={cfg['images']}", "data.num_workers=0",
                                                    "loss.disc_start=0", *extra])
        return TokenizerTrainer(tok, out)
    prior = load_prior_config(cfg["stage"], cfg["preset"], [f"tokenizer={cfg['tokenizer']}", "train.val_fraction=0",
                                                            *extra])
    return TRAINERS[cfg["stage"]](prior, out)


def worker(cfg):
    sys.path.insert(0, ROOT)
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    trainer = _trainer(cfg)
    batches = trainer._epoch_iter(0)

    counter = FlopCounterMode(display=False)
    with counter:
        train_step(trainer, batches, 0)
    times = []
    for i in range(1, 1 + cfg["steps"]):
        t0 = time.perf_counter()
        train_step(trainer, batches, i)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _high_water()  # the GPU's on a GPU
    return {"batch": trainer.cfg.train.batch_size, "median_s": statistics.median(times) if times else None,
            "flops": counter.get_total_flops(), "peak_gib": peak / 2 ** 30, "threads": torch.get_num_threads(),
            "device": str(trainer.acc.device)}


def _high_water() -> int:
    """This process's peak resident memory in bytes: VmHWM (ru_maxrss would carry the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _rss_gib(pid: int) -> float:
    """Resident memory of a running process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 2 ** 20 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0.0


def _run(cfg, limit_gib: float, timeout=3600):
    """One worker; killed (and reported so) once its resident memory passes ``limit_gib``, before the machine's
    out-of-memory killer picks a process of its own."""
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, over = time.time() + timeout, False
    while p.poll() is None and time.time() < deadline:
        if _rss_gib(p.pid) > limit_gib:
            over = True
            p.kill()
        time.sleep(0.2)
    if p.poll() is None:
        p.kill()
    out, err = p.communicate()
    if over:
        return {"error": f"over {limit_gib:.0f} GiB", "over_memory": True}
    if p.returncode:
        return {"error": (err.strip().splitlines() or [f"exit {p.returncode}"])[-1][:200]}
    return json.loads(out.strip().splitlines()[-1])


def _images(root, n):
    import numpy as np
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(os.path.join(root, f"{i:03d}.png"))
    return root


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1, help="timed steps after the counted one")
    ap.add_argument("--memory-gib", type=float, default=20.0, help="resident memory at which a row's process is stopped and its batch halved")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed fraction of H100 bf16 peak for the GPU estimate")
    ap.add_argument("--rows", default=",".join(f"{s}:{p}" for s, p in ROWS))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "presets"))
    ap.add_argument("--update", action="store_true", help="keep the rows of an existing --out that --rows leaves out")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    sys.path.insert(0, ROOT)

    from stage1_tokenizer.config import load_tokenizer_config
    from stage1_tokenizer.train import train_tokenizer
    from stage2_prior.config import load_prior_config

    start, load_start = time.time(), os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = _images(os.path.join(tmp, "images"), 80)
        tok = os.path.join(tmp, "f16")
        train_tokenizer(load_tokenizer_config("vqgan-f16", [f"data.source={images}", "train.batch_size=2",
                                                            "train.max_steps=2", "train.epochs=null",
                                                            "data.num_workers=0"]), tok)
        for spec in args.rows.split(","):
            stage, preset = spec.split(":")
            base = dict(stage=stage, preset=preset, images=images, tokenizer=tok, tmp=tmp, steps=0)
            configured = (load_tokenizer_config(preset) if stage == "tokenizer" else
                          load_prior_config(stage, preset)).train.batch_size
            row = {"stage": stage, "preset": preset, "configured_batch": configured}
            batch, res = configured, {}
            while True:  # the configured batch, halved while it does not fit --memory-gib
                res = _run({**base, "batch": batch, "steps": args.steps}, args.memory_gib)
                if not res.get("over_memory") or batch == 1:
                    break
                batch //= 2
            rows.append({**row, **res})
            if "flops" in res:
                rows[-1]["gpu_estimate_s"] = res["flops"] * configured / batch / (H100_BF16_FLOPS * args.mfu)
            print(rows[-1], flush=True)
    if args.update and os.path.exists(args.out + ".json"):  # re-measured rows replace theirs, the rest stay
        with open(args.out + ".json") as f:
            kept = json.load(f)["results"]
        fresh = {(r["stage"], r["preset"]): r for r in rows}
        rows = [fresh.pop((r["stage"], r["preset"]), r) for r in kept] + list(fresh.values())
    meta = machine_meta(start, load_start, mfu=args.mfu, memory_gib=args.memory_gib, measured_rows=args.rows)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)
    lines = ["# Paper-scale presets: one training step at the configured batch", "",
             f"- Date: {meta['date']}; command: `{meta['command']}`; torch {meta['torch']}, {meta['threads']} threads, "
             f"fp32; CPU capability {meta['cpu_capability']}, native bf16: {meta['native_bf16']}; 1-min load "
             f"{load_start:.2f} at start, {meta['load_end']:.2f} at end; runtime {meta['runtime_s']:.0f} s.",
             f"- Synthetic 256x256 colour images; priors on a `vqgan-f16` tokenizer's 16x16 codes. Peak = the process's "
             f"maximum resident memory (model, optimiser, one step). Where the configured batch passed "
             f"{args.memory_gib:.0f} GiB, the batch was halved until it fitted; the time is for the batch that ran. "
             f"GPU estimate: counted FLOPs of one configured-batch step at "
             f"{100 * args.mfu:.0f}% of an H100's dense bf16 {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s (an assumption, "
             "not a measurement).",
             *([f"- This run measured {args.rows}; the other rows are kept from the file's earlier run."]
               if args.update else []), "",
             "| stage | preset | configured batch | ran at | s / step (CPU) | peak GiB | TFLOP / step at configured | "
             "GPU estimate s / step |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['stage']} | {r['preset']} | {r['configured_batch']} | - | {r['error'][:80]} | | | |")
        else:
            lines.append(f"| {r['stage']} | {r['preset']} | {r['configured_batch']} | {r['batch']} | "
                         f"{r['median_s']:.1f} | {r['peak_gib']:.1f} | "
                         f"{r['flops'] * r['configured_batch'] / r['batch'] / 1e12:.2f} | {r['gpu_estimate_s']:.3f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
