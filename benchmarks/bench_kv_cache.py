"""Tokens per second of GPT-prior sampling: ``generate`` (KV cache), the static-cache decoders, and the
recompute-everything loop, side by side.

    python benchmarks/bench_kv_cache.py                  # -> benchmarks/results/kv_cache.{json,md}
    python benchmarks/bench_kv_cache.py --lengths 64 256 --batch 4 --recompute

``static`` and ``compiled`` are ``sample_sequences(..., decoder=...)``: a preallocated KV cache and (compiled)
one torch.compile'd decode step; their samples are checked equal to ``generate``'s for the same generator,
and their speed-up is over ``generate`` in the same run (the compiled row's first call, compilation
included, is reported apart).

The no-cache loop is the one taming-transformers / VQGAN-pytorch use: every new token runs the whole
prefix through the transformer again, takes the last position's logits, top-k filters and samples.
The cached path is ``stage2_prior.gpt.sample_sequences`` (``generate`` with its KV cache, the code
path the priors use). Same model, batch, top-k and temperature; one warm-up run, then the fastest of
``--repeats`` timed runs (a busy machine shows up as noise: the load average is recorded per row).
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

from stage2_prior.config import GPTConfig
from stage2_prior.gpt import build_gpt
from stage2_prior.vqgpt_pipeline import sample_sequences, start_tokens

HERE = os.path.dirname(os.path.abspath(__file__))


@torch.no_grad()
def sample_without_cache(model, batch: int, num_codes: int, seq_len: int, top_k: int, temperature: float = 1.0):
    """taming's ``sample``: re-run the full sequence for every token (no past key/values)."""
    x = start_tokens(batch, num_codes).to(model.device)
    for _ in range(seq_len):
        logits = model(input_ids=x, use_cache=False).logits[:, -1, :num_codes] / temperature
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
        x = torch.cat([x, torch.multinomial(logits.softmax(-1), 1)], dim=1)
    return x[:, 1:]


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 256])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--recompute", action="store_true", help="also time the recompute-everything loop (slow)")
    p.add_argument("--num-codes", type=int, default=1024)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.path.join(HERE, "results", "kv_cache"))
    args = p.parse_args()
    torch.manual_seed(0)
    top_k = 300
    rows = []
    for length in args.lengths:
        model = build_gpt(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, dropout=0.0),
                          args.num_codes, length).eval().to(args.device)
        def sample(decoder):
            return sample_sequences(model, args.batch, args.num_codes, length, top_k,
                                    generator=torch.Generator().manual_seed(0), decoder=decoder)
        t0 = time.perf_counter()
        first = sample("compiled")
        compile_s = time.perf_counter() - t0
        identical = all(torch.equal(sample("generate"), x) for x in (first, sample("static")))
        times = {d: best_time(lambda d=d: sample(d), args.repeats) for d in ("generate", "static", "compiled")}
        if args.recompute:
            times["recompute"] = best_time(lambda: sample_without_cache(model, args.batch, args.num_codes, length,
                                                                        top_k), args.repeats)
        tokens = args.batch * length
        row = {"length": length, "batch": args.batch, "identical_samples": identical,
               "compiled_first_call_s": compile_s, "load_avg_1m": os.getloadavg()[0],
               **{f"{d}_tok_s": tokens / t for d, t in times.items()},
               **{f"{d}_vs_generate": times["generate"] / t for d, t in times.items() if d != "generate"}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    params = sum(p.numel() for p in model.parameters())
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "model": {"n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd,
                      "vocab": args.num_codes + 1, "params": params},
            "top_k": top_k, "device": args.device}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    cols = ["generate", "static", "compiled"] + (["recompute"] if args.recompute else [])
    lines = [f"# GPT-prior sampling: generate vs the static-cache decoders ({meta['date']})", "",
             f"`{meta['command']}`; device {args.device}; torch {meta['torch']}, {meta['threads']} threads, "
             f"{meta['cpu_count']} CPUs; GPT-2 {args.n_layer} layers x {args.n_embd} ({params / 1e6:.2f}M params), "
             f"vocabulary {args.num_codes + 1}, batch {args.batch}, top-k {top_k}, fastest of {args.repeats} runs "
             "after a warm-up.", "",
             "| length | " + " | ".join(f"{c} tok/s" for c in cols) + " | static / compiled vs generate | "
             "identical samples | compiled first call s | load avg |",
             "|---:|" + "---:|" * len(cols) + "---:|---|---:|---:|"]
    lines += [f"| {r['length']} | " + " | ".join(f"{r[c + '_tok_s']:.0f}" for c in cols) +
              f" | {r['static_vs_generate']:.2f}x / **{r['compiled_vs_generate']:.2f}x** | {r['identical_samples']} | "
              f"{r['compiled_first_call_s']:.1f} | {r['load_avg_1m']:.2f} |" for r in rows]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
