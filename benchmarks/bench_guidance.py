"""Guided against unguided sampling of a class-conditional GPT prior, side by side in one process.

    python benchmarks/bench_guidance.py            # -> benchmarks/results/guidance.{json,md}

The demo's GPT (``tiny`` preset: 4 layers, 128 wide) over 64-token grids with K = 256 codes and 10 classes, batch
100, top-k 75: ``sample_sequences`` with ``guidance_scale`` 1 (one conditional pass per token, the static KV
cache) and 2 (the batch ``[cond; null]`` through one static cache of twice the rows). Runs alternate; the ratio
is min/min over ``--repeats`` (interference only adds time). Target: guided at most 2.1x unguided.
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time

import torch

from stage2_prior.config import load_prior_config
from stage2_prior.gpt import build_gpt
from stage2_prior.vqgpt_pipeline import sample_sequences

HERE = os.path.dirname(os.path.abspath(__file__))
K, SEQ, CLASSES, TOP_K = 256, 64, 10, 75


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(HERE, "results", "guidance"))
    args = p.parse_args()
    torch.manual_seed(0)
    model = build_gpt(load_prior_config("gpt", "tiny").gpt, K, SEQ, num_classes=CLASSES).eval()
    labels = torch.arange(args.batch) % CLASSES
    times = {1.0: [], 2.0: []}
    load_start = os.getloadavg()[0]
    for _ in range(args.repeats + 1):  # the first round warms up
        for scale in times:
            start = time.perf_counter()
            sample_sequences(model, args.batch, K, SEQ, TOP_K, generator=torch.Generator().manual_seed(0),
                             class_labels=labels, decoder="static", guidance_scale=scale)
            times[scale].append(time.perf_counter() - start)
    best = {s: min(t[1:]) for s, t in times.items()}
    ratio = best[2.0] / best[1.0]
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.processor() or platform.machine(), "load_start": load_start,
            "load_end": os.getloadavg()[0]}
    result = {"meta": meta, "batch": args.batch, "seq_len": SEQ, "num_codes": K, "top_k": TOP_K,
              "unguided_s": best[1.0], "guided_s": best[2.0], "ratio": ratio, "target": 2.1, "met": ratio <= 2.1,
              "runs_s": {str(s): t[1:] for s, t in times.items()}}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(f"# Guided sampling cost\n\n- {meta['date']}, `{meta['command']}`, torch {meta['torch']}, "
                f"{meta['threads']} threads, CPU capability {meta['cpu_capability']}; load {load_start:.2f} -> "
                f"{meta['load_end']:.2f}\n- GPT `tiny` preset, {SEQ} tokens, K = {K}, {CLASSES} classes, batch "
                f"{args.batch}, top-k {TOP_K}, static KV cache; min of {args.repeats} alternated runs\n\n"
                f"| sampling | seconds |\n|---|---:|\n| unguided (scale 1) | {best[1.0]:.2f} |\n"
                f"| guided (scale 2) | {best[2.0]:.2f} |\n\n**Guided / unguided: {ratio:.2f}x** (target <= 2.1x: "
                f"{'met' if ratio <= 2.1 else 'MISSED'})\n")
    print(f"unguided {best[1.0]:.2f} s, guided {best[2.0]:.2f} s: {ratio:.2f}x; wrote {args.out}.md")


if __name__ == "__main__":
    main()
