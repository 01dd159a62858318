"""`train.compile`: step time of the demo's three trainers eager vs torch.compile'd, side by side.

    python benchmarks/bench_compile.py     # -> benchmarks/results/compile.{json,md}

Each (stage, compile) runs in a fresh subprocess (this file with --worker): the `mnist` tokenizer (vq,
MSE + LPIPS on 8 images, batch 32), and the `tiny` GPT and `tiny` LDM on that tokenizer's 8x8 codes,
each in fp32 and in bf16 autocast. The first ``--warmup`` steps (compilation included) are timed as
one figure; then ``--steps`` steps, of which the median per-step time is reported. The priors' code
cache comes from a 2-step `mnist` tokenizer on 2,048 images, trained once for the whole benchmark.
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


def worker(cfg):
    sys.path.insert(0, ROOT)
    from stage1_tokenizer.config import load_tokenizer_config
    from stage1_tokenizer.train import TokenizerTrainer
    from stage2_prior.config import load_prior_config
    from stage2_prior.train import TRAINERS

    extra = [f"train.compile={str(cfg['compile']).lower()}", f"train.mixed_precision='{cfg['precision']}'", *QUIET]
    out = os.path.join(cfg["tmp"], f"{cfg['stage']}-{cfg['compile']}-{cfg['precision']}")
    if cfg["stage"] == "tokenizer":
        trainer = TokenizerTrainer(load_tokenizer_config("mnist", ["quantizer.name=vq", "data.num_images=2048",
                                                                          *extra]), out)
    else:
        prior = load_prior_config(cfg["stage"], "tiny", [f"tokenizer={cfg['tokenizer']}", "train.val_fraction=0",
                                                         *extra])
        trainer = TRAINERS[cfg["stage"]](prior, out)
    batches = trainer._epoch_iter(0)
    step = 0

    def run(n):
        nonlocal step
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            train_step(trainer, batches, step)
            times.append(time.perf_counter() - t0)
            step += 1
        return times

    warm = sum(run(cfg["warmup"]))
    times = run(cfg["steps"])
    return {"warmup_s": warm, "median_s": statistics.median(times), "min_s": min(times), "n": len(times)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--stages", default="tokenizer,gpt,ldm")
    ap.add_argument("--eager-only", action="store_true", help="skip the compiled rows (fp32 vs bf16 alone)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "compile"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    sys.path.insert(0, ROOT)

    start, load_start = time.time(), os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tok = os.path.join(tmp, "tok")
        from stage1_tokenizer.config import load_tokenizer_config
        from stage1_tokenizer.train import train_tokenizer
        train_tokenizer(load_tokenizer_config("mnist", ["quantizer.name=vq", "data.num_images=2048",
                                                               "train.max_steps=2"]), tok)
        for stage in args.stages.split(","):
            for precision in ("no", "bf16"):
                for compiled in (False,) if args.eager_only else (False, True):
                    cfg = dict(stage=stage, compile=compiled, precision=precision, steps=args.steps,
                               warmup=args.warmup, tmp=tmp, tokenizer=tok)
                    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                                       capture_output=True, text=True, timeout=1200)
                    res = (json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else
                           {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:200]})
                    rows.append(dict(stage=stage, precision=precision, compile=compiled, **res))
                    print(rows[-1], flush=True)
    def timed(stage, precision, compiled):  # the measured row of that setting, if any
        return next((e for e in rows if (e["stage"], e["precision"], e["compile"]) == (stage, precision, compiled)
                     and "median_s" in e), None)

    for r in rows:
        eager, fp32 = timed(r["stage"], r["precision"], False), timed(r["stage"], "no", r["compile"])
        if r["compile"] and eager and "median_s" in r:
            r["speedup"] = eager["median_s"] / r["median_s"]
        if r["precision"] == "bf16" and fp32 and "median_s" in r:
            r["bf16_vs_fp32"] = r["median_s"] / fp32["median_s"]
    meta = machine_meta(start, load_start)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)
    lines = ["# `train.compile`: training step time, eager vs torch.compile", "",
             f"- Date: {meta['date']}; command: `{meta['command']}`; torch {meta['torch']}, {meta['threads']} threads; "
             f"1-min load average {load_start:.2f} at start, {meta['load_end']:.2f} at end; runtime "
             f"{meta['runtime_s']:.0f} s; CPU capability {meta['cpu_capability']}, native bf16: {meta['native_bf16']} "
             "(what `train.mixed_precision=auto` follows)",
             "- Stages: the `mnist` tokenizer (vq; MSE + LPIPS on 8 of 32 images), the `tiny` GPT (batch 64) and "
             "`tiny` LDM (batch 128) on its 8x8 codes. Quantizers and LPIPS stay eager under compile.",
             f"- Each row a fresh process: the first {args.warmup} steps (compilation included) as one figure, then "
             f"the median of {args.steps} steps.", "",
             "| stage | precision | compile | first steps s | median step ms | speed-up | bf16 / fp32 time |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['stage']} | {r['precision']} | {r['compile']} | - | - | {r['error'][:80]} | - |")
        else:
            speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
            ratio = f"{r['bf16_vs_fp32']:.2f}x" if "bf16_vs_fp32" in r else "-"
            lines.append(f"| {r['stage']} | {r['precision']} | {r['compile']} | {r['warmup_s']:.1f} | "
                         f"{1e3 * r['median_s']:.0f} | {speedup} | {ratio} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
