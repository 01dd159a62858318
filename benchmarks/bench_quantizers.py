"""Forward+backward time and peak memory of the quantizer variants, against a bare bound and vector-quantize-pytorch.

    python benchmarks/bench_quantizers.py                 # full grid -> benchmarks/results/quantizers.{json,md}
    python benchmarks/bench_quantizers.py --quick         # one small config, smoke test -> benchmarks/results/quick.{json,md}
    python benchmarks/bench_quantizers.py --device cuda   # default: cuda if available, else cpu

Every (variant, D, K) runs in a fresh subprocess (this file with --worker) on z of shape (16, D, 32, 32),
i.e. N = 16,384 latents. One step is ``out = q(z); (out.quantized.square().mean() + out.loss).backward()``,
timed over a few repeats after one warm-up, each paired with a `bound` step in the same process so that
both see the same machine load; the ratio to the bound is min/min (interference only adds time). Peak memory is what the step allocates on top of the
memory held after inputs and model are built:
  cpu:  VmHWM - VmRSS from /proc/self/status, VmHWM reset to VmRSS (echo 5 > /proc/self/clear_refs) after setup;
        an allocation cap (RLIMIT_DATA) turns runaway configs into a reported OOM instead of a dead machine.
  cuda: torch.cuda.max_memory_allocated() - memory_allocated(), peak stats reset after setup.

Rows:
  bound  nearest_code(z_flat, C) (tiled addmm + min) then C[idx], zq = z + (c - z).detach() with
         the same permutes as the library, backward of zq.square().mean() + C[idx].square().mean()
         (so the gather's backward, a scatter-add into C.grad, is included). Nothing else: no loss, no stats.
  vqp    vector_quantize_pytorch.VectorQuantize(dim=D, codebook_size=K, learnable_codebook=True,
         ema_update=False, rotation_trick=False): learnable codebook + straight-through, like `vq`
         (its loss is commitment_weight=1 * mse(C[idx], z) with gradient to both sides), input (B, H*W, D).
  *-floor  bound plus the work any exact step of that variant must add (see floor_step): what a 2x target
         can be judged against.
  others build_quantizer(name, K, D) in train mode (replacement="none" where a variant has maintenance);
         fsq at K = 8192, a size without a row in the FSQ paper's table, takes levels [8, 8, 8, 4, 4].
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time

import torch
from harness import SQUARE, square_matmul  # benchmarks/ is on the path of a script run from it

B, H, W = 16, 32, 32  # N = 16,384 latents
VARIANTS = ["bound", "vq", "ns-vq", "ns-vq-floor", "diveq", "simvq", "transvq", "transvq-floor", "rotation", "vqp",
            "fsq", "lfq", "bsq", "ibq"]
FSQ_LEVELS = {8192: [8, 8, 8, 4, 4]}  # K without a row in the FSQ paper's table
SEARCH_FREE = ("fsq", "lfq")  # no nearest-code search: expected faster than `vq`
DIMS = [8, 64]
CODES = [1024, 8192, 65536]
MIN_REPEATS = 5
HERE = os.path.dirname(os.path.abspath(__file__))


# --- worker: one configuration in its own process ------------------------------------------------

def proc_status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB -> bytes
    return 0


def make_step(variant, K, D, device):
    """A closure doing one forward+backward, and the tensors whose .grad it fills."""
    from stage1_tokenizer.quantizers import build_quantizer, nearest_code
    torch.manual_seed(0)
    if variant == "vqp":
        from vector_quantize_pytorch import VectorQuantize
        q = VectorQuantize(dim=D, codebook_size=K, learnable_codebook=True, ema_update=False,
                           rotation_trick=False).to(device).train()
        x = torch.randn(B, H * W, D, device=device, requires_grad=True)

        def step():
            quantized, _, loss = q(x)
            (quantized.square().mean() + loss).backward()
        return step, [x, *q.parameters()]
    z = torch.randn(B, D, H, W, device=device, requires_grad=True)
    if variant == "bound":
        C = torch.empty(K, D, device=device).uniform_(-1 / K, 1 / K).requires_grad_()

        def step():
            flat = z.permute(0, 2, 3, 1).reshape(-1, D)
            idx, _ = nearest_code(flat, C)
            c = C[idx]
            zq = (flat + (c - flat).detach()).view(B, H, W, D).permute(0, 3, 1, 2)
            (zq.square().mean() + c.square().mean()).backward()
        return step, [z, C]
    if variant.endswith("-floor"):
        return floor_step(variant, K, D, device)
    from stage1_tokenizer.quantizers import QUANTIZERS
    options = {"replacement": "none"} if QUANTIZERS[variant].maintained else {}
    if variant == "fsq" and K in FSQ_LEVELS:
        options["levels"] = FSQ_LEVELS[K]
    q = build_quantizer(variant, K, D, **options).to(device).train()

    def step():
        out = q(z)
        (out.quantized.square().mean() + out.loss).backward()
    return step, [z, *q.parameters()]


def floor_step(variant, K, D, device):
    """The `bound` step plus the work any exact step of ``variant`` must add, with torch's fastest kernels.

    ns-vq-floor: Eq. 17's three unavoidable passes over every (latent, code) pair, in the search's cache-sized tiles
    (a lower bound: the real softmax spans all K codes): the logits (one matmul), one exp each (torch's fused
    softmax, its fastest exp) and the weighted sums the gradient needs (one matmul); no clamp, winner weight or
    loss value. transvq-floor: the map ``P(C)`` over all K codes without autograd, which the search needs; no
    gradient through it.
    """
    from stage1_tokenizer.quantizers import build_quantizer
    from stage1_tokenizer.quantizers.search import DEFAULT_MAX_ELEMENTS, search_plan
    bound, grads = make_step("bound", K, D, device)
    z, C = grads
    if variant == "transvq-floor":
        q = build_quantizer("transvq", K, D, replacement="none").to(device).train()

        def extra():
            with torch.no_grad():
                q.transform(q.codebook)
    else:
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, D)
        left = torch.cat([flat, flat.new_ones(len(flat), 1)], 1)
        stats = torch.cat([left, flat.pow(2).sum(1, keepdim=True)], 1)
        rows, codes, _ = search_plan(device, len(flat), K, DEFAULT_MAX_ELEMENTS)  # the search's tiles

        def extra():
            right = torch.cat([C.detach() * 2, -C.detach().pow(2).sum(1, keepdim=True)], 1)
            acc = C.new_zeros(D + 2, K)
            for r0 in range(0, len(flat), rows):
                for c0 in range(0, K, codes):  # a softmax over a tile's codes: the same number of exps
                    w = torch.softmax(left[r0 : r0 + rows] @ right[c0 : c0 + codes].T, dim=1)
                    acc[:, c0 : c0 + codes].addmm_(stats[r0 : r0 + rows].T, w)

    def step():
        extra()
        bound()
    return step, grads


def timed(step, grads, sync):
    for t in grads:
        t.grad = None
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - t0


def worker(cfg):
    """Peak memory over the warm-up and first step; then time steps alternated with `bound` steps and a square
    matmul (the rate behind ``x limit``)."""
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step, grads = make_step(cfg["variant"], cfg["K"], cfg["D"], device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = proc_status("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass  # then VmHWM may include setup transients: an overestimate
        cap = proc_status("VmData") + int(cfg["mem_cap_gib"] * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    try:
        warm = timed(step, grads, sync)
        times = [timed(step, grads, sync)]
        peak = torch.cuda.max_memory_allocated() - base if cuda else proc_status("VmHWM") - base
        # alternate with the bound in this process, so both see the same machine load
        ref, bound_times = None, []
        if cfg["variant"] != "bound":
            ref = make_step("bound", cfg["K"], cfg["D"], device)
            timed(*ref, sync)  # its warm-up
            bound_times.append(timed(*ref, sync))
        square = square_matmul(device)
        timed(square, [], sync)
        square_times = [timed(square, [], sync)]
        per_step = times[0] + (bound_times[0] if ref else 0)
        repeats = max(MIN_REPEATS, min(cfg["repeats"], int(cfg["budget_s"] / per_step)))  # fewer for slow configs
        while len(times) < repeats:
            if ref and len(times) % 2:  # alternate which of the pair runs first
                bound_times.append(timed(*ref, sync))
                times.append(timed(step, grads, sync))
            else:
                times.append(timed(step, grads, sync))
                if ref:
                    bound_times.append(timed(*ref, sync))
            square_times.append(timed(square, [], sync))
    except (RuntimeError, MemoryError) as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if "alloc" not in str(e).lower() and "out of memory" not in str(e).lower():
            raise
        return {"error": f"OOM: {str(e).splitlines()[0][:120]}"}
    out = {"ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "warmup_ms": 1e3 * warm,
           "runs_ms": [1e3 * t for t in times], "peak_mib": peak / 2**20}
    # the matmul limit of a step: 2 N K D FLOPs (the distance matmul alone) at the best square-matmul rate
    out["matmul_gflops"] = 2 * SQUARE**3 / min(square_times) / 1e9
    out["limit_ms"] = 2 * B * H * W * cfg["K"] * cfg["D"] / (out["matmul_gflops"] * 1e9) * 1e3
    out["x_limit"] = out["min_ms"] / out["limit_ms"]
    if ref:
        out["bound_runs_ms"] = [1e3 * t for t in bound_times]
        out["ratio"] = min(times) / min(bound_times)  # what the targets use
        out["ratio_paired_median"] = statistics.median([t / b for t, b in zip(times, bound_times)])
    return out


# --- driver ----------------------------------------------------------------------------------------

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def quantizer_sha():
    """Hash of the quantizer sources, to tell whether the library changed during a run."""
    src = os.path.join(os.path.dirname(HERE), "stage1_tokenizer", "quantizers")
    digest = hashlib.sha1()
    for name in sorted(os.listdir(src)):
        if name.endswith(".py"):
            with open(os.path.join(src, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:10]


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


def run_config(cfg, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {p.returncode}: {tail[:160]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def targets(rows, cap_mib):
    """The targets, each as (text, met) from the measured rows."""
    get = {(r["variant"], r["D"], r["K"]): r for r in rows}
    out = []
    for K in CODES:
        r = get.get(("vq", 64, K))
        if K >= 8192 and r and r.get("x_limit") is not None:
            out.append((f"`vq` fwd+bwd <= 1.5x the matmul limit 2NKD, D=64 K={K}: {r['x_limit']:.2f}x "
                        f"({r['min_ms']:.0f} ms vs {r['limit_ms']:.0f} ms at {r['matmul_gflops']:.0f} GFLOP/s)",
                        r["x_limit"] <= 1.5))
    for D in DIMS:
        for K in CODES:
            r = get.get(("vq", D, K))
            if r and r.get("ratio") is not None:
                out.append((f"`vq` fwd+bwd <= 1.3x bound, D={D} K={K}: {r['ratio']:.2f}x", r["ratio"] <= 1.3))
    K = 65536
    for D in DIMS:
        vq, vqp = get.get(("vq", D, K)), get.get(("vqp", D, K))
        if not (vq and vqp) or vq.get("peak_mib") is None:
            continue
        if vqp.get("peak_mib") is not None:
            ratio = vq["peak_mib"] / vqp["peak_mib"]
            out.append((f"`vq` peak <= 1/4 of vqp, D={D} K={K}: {vq['peak_mib']:.0f} vs {vqp['peak_mib']:.0f} MiB "
                        f"({ratio:.3f}x)", ratio <= 0.25))
        elif "OOM" in vqp.get("error", "") and cap_mib:
            out.append((f"`vq` peak <= 1/4 of vqp, D={D} K={K}: {vq['peak_mib']:.0f} MiB vs vqp OOM at the "
                        f"{cap_mib:.0f} MiB cap (so vqp > {cap_mib:.0f} MiB; vq/vqp < {vq['peak_mib'] / cap_mib:.3f})",
                        vq["peak_mib"] <= cap_mib / 4))
    for D in DIMS:
        ns = get.get(("ns-vq", D, K))
        if ns and ns.get("peak_mib") is not None:
            full_mib = B * H * W * K * 4 / 2**20  # one N x K fp32 matrix
            out.append((f"`ns-vq` dense loss bounded memory, D={D} K={K}: peak {ns['peak_mib']:.0f} MiB "
                        f"(criterion: < one N x K fp32 matrix = {full_mib:.0f} MiB)", ns["peak_mib"] < full_mib))
    for variant, where in (("ns-vq", [(D, K) for D in DIMS for K in CODES]), ("transvq", [(D, 65536) for D in DIMS])):
        for D, K in where:
            r, vq = get.get((variant, D, K)), get.get(("vq", D, K))
            if not (r and vq) or vq.get("min_ms") is None:
                continue
            if r.get("min_ms") is None:
                out.append((f"`{variant}` within 2x of `vq`, D={D} K={K}: failed ({r['error']})", False))
                continue
            slowdown = r["min_ms"] / vq["min_ms"]  # both min over steps of one benchmark run
            floor = get.get((f"{variant}-floor", D, K)) or {}
            note = ""
            if floor.get("min_ms") is not None:
                at_floor = floor["min_ms"] / vq["min_ms"]
                note = f"; its floor `{variant}-floor` {at_floor:.2f}x" + (
                    ": 2x is out of reach with torch's kernels" if at_floor > 2 else "")
            out.append((f"`{variant}` within 2x of `vq`, D={D} K={K}: {slowdown:.2f}x "
                        f"({r['min_ms']:.0f} vs {vq['min_ms']:.0f} ms){note}", slowdown <= 2))
    for variant in SEARCH_FREE:
        for D in DIMS:
            for K in CODES:
                r, vq = get.get((variant, D, K)), get.get(("vq", D, K))
                if r and vq and r.get("min_ms") is not None and vq.get("min_ms") is not None:
                    out.append((f"`{variant}` (no search) faster than `vq`, D={D} K={K}: {r['min_ms'] / vq['min_ms']:.2f}x "
                                f"({r['min_ms']:.1f} vs {vq['min_ms']:.1f} ms)", r["min_ms"] < vq["min_ms"]))
    return out


def write_markdown(path, meta, rows, checks):
    lines = [
        "# Quantizer benchmark: forward+backward time and peak memory", "",
        f"- Date: {meta['date']}",
        f"- Command: `{meta['command']}`",
        f"- Library: commit {meta['library']}"
        + (" -- WARNING: the quantizer sources changed during the run, rows are mixed" if meta["library_changed"] else ""),
        f"- Device: {meta['device']} ({meta['device_name']}), torch {meta['torch']}, {meta['threads']} threads; "
        f"1-min load average {meta['load_start']:.2f} at start, {meta['load_end']:.2f} at end",
        f"- Input: z of shape ({B}, D, {H}, {W}), N = {B * H * W} latents; step = forward + "
        "`(out.quantized.square().mean() + out.loss).backward()`",
        f"- Time: each config in a fresh subprocess: 1 warm-up step, then n timed steps, n = clamp({meta['budget_s']:g}"
        f" s / first step time, {MIN_REPEATS}, {meta['repeats']}). In the same subprocess each timed step is paired "
        "with a `bound` step at the same D, K (warmed up too; alternately before and after it), so both see the same "
        "machine load. `x bound` = min step time / min paired bound time (interference from other processes only "
        "adds time, so the minimum is the cleanest estimate; the targets use it); `paired` = median over pairs of "
        "step time / bound time; `bound min ms` = the minimum of the paired bound steps.",
        "- Peak memory, over the warm-up and first timed step (before the bound is built): " + (
                             "`torch.cuda.max_memory_allocated()` minus `memory_allocated()` after setup "
                             "(peak stats reset after building inputs and model)." if meta["device"] == "cuda" else
                             "VmHWM minus VmRSS (from /proc/self/status) of the subprocess, VmHWM reset to VmRSS "
                             "(`echo 5 > /proc/self/clear_refs`) after building inputs and model; so it is the extra "
                             "resident memory of the steps (activations, gradients, allocator slack). "
                             f"Allocations are capped at {meta['mem_cap_gib']} GiB (RLIMIT_DATA): OOM = needs more."),
        "- `bound`: `nearest_code(z_flat, C)` (the library's tiled addmm + min search) + `C[idx]` + "
        "straight-through `z + (c - z).detach()` with the library's permutes; backward of "
        "`zq.square().mean() + c.square().mean()` (the gather's scatter-add into C.grad included). No loss, no stats.",
        "- `vqp`: vector-quantize-pytorch 1.32.0 `VectorQuantize(dim=D, codebook_size=K, learnable_codebook=True, "
        "ema_update=False, rotation_trick=False)`: learnable codebook, straight-through, commitment_weight=1 "
        "(not its default EMA codebook); input (B, H*W, D).",
        "- Library variants: `build_quantizer(name, K, D, replacement=\"none\")`, train mode (the fixed tables of "
        "`fsq`, `lfq`, `bsq` have no replacement option; `fsq` at K = 8192, which the FSQ paper's table lacks, "
        "takes levels [8, 8, 8, 4, 4]; elsewhere its K is the table's: 1,000 for 1,024, 64,000 for 65,536). "
        "`lfq` and `ibq` compute their released entropy over all K codes, `bsq` per bit.",
        "- Floors: `bound` plus the work any exact step of the variant must add, with torch's fastest kernels. "
        "`ns-vq-floor`: Eq. 17's logits (one matmul), one exp per (latent, code) pair (torch's fused softmax) and the "
        "weighted sums its gradient needs (one matmul), in the search's cache-sized tiles (a lower bound). "
        "`transvq-floor`: the map `P(C)` over all K codes without autograd, which the search needs. A floor above 2x "
        "`vq` puts the 2x target out of reach without hand-written fused kernels.", "",
        "- `x limit` = min ms / the matmul limit `2 N K D` FLOPs at the best rate of a "
        f"{SQUARE} x {SQUARE} fp32 matmul timed between the steps in the same subprocess (`GFLOP/s`).",
        "",
        "| variant | D | K | median ms | min ms | peak MiB | x bound | paired | bound min ms | x limit | GFLOP/s | n | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.get("error"):
            peak = f"> {meta['mem_cap_gib'] * 1024:.0f}" if r["error"].startswith("OOM") and meta["device"] == "cpu" else "-"
            lines.append(f"| {r['variant']} | {r['D']} | {r['K']} | - | - | {peak} | - | - | - | - | - | - | {r['error'][:90]} |")
        else:
            bound = min(r["bound_runs_ms"]) if "bound_runs_ms" in r else None
            lines.append(f"| {r['variant']} | {r['D']} | {r['K']} | {r['ms']:.1f} | {r['min_ms']:.1f} | "
                         f"{r['peak_mib']:.1f} | {fmt(r.get('ratio'), '.2f')} | "
                         f"{fmt(r.get('ratio_paired_median'), '.2f')} | {fmt(bound, '.1f')} | "
                         f"{fmt(r.get('x_limit'), '.2f')} | {fmt(r.get('matmul_gflops'), '.0f')} | {len(r['runs_ms'])} | |")
    lines += ["", "## Targets", ""]
    lines += [f"- {'MET' if ok else 'MISSED'}: {text}" for text, ok in checks] or ["- (not enough rows to judge)"]
    lines += ["", f"Total runtime: {meta['runtime_s']:.0f} s", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="one small config (D=8, K=1024), smoke test")
    ap.add_argument("--repeats", type=int, default=15, help=f"most timed steps after the warm-up (least {MIN_REPEATS})")
    ap.add_argument("--budget-s", type=float, default=8.0, help="per-config time budget for the timed steps")
    ap.add_argument("--mem-cap-gib", type=float, default=14.0, help="cpu allocation cap per config")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per config before giving up")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=None, help="output path without extension")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    dims, codes = ([8], [1024]) if args.quick else (DIMS, CODES)
    out = args.out or os.path.join(HERE, "results", "quick" if args.quick else "quantizers")
    variants = args.variants.split(",")
    if "bound" not in variants:
        variants.insert(0, "bound")
    start, load_start, commit, sha = time.time(), os.getloadavg()[0], git_commit(), quantizer_sha()
    rows = []
    for D in dims:
        for K in codes:
            for v in variants:
                cfg = dict(variant=v, D=D, K=K, device=args.device, repeats=args.repeats,
                           budget_s=args.budget_s, mem_cap_gib=args.mem_cap_gib)
                t0 = time.time()
                res = run_config(cfg, args.timeout)
                row = dict(variant=v, D=D, K=K, **res)
                rows.append(row)
                msg = row.get("error") or f"{row['ms']:9.1f} ms {row['peak_mib']:9.1f} MiB  x{row.get('ratio', 1):.2f}"
                print(f"[{time.time() - start:6.0f}s] {v:9s} D={D:<3d} K={K:<6d} {msg}  ({time.time() - t0:.0f}s)",
                      flush=True)

    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                command=shlex.join([os.path.relpath(sys.executable), *sys.argv]),
                device=args.device, torch=torch.__version__, threads=torch.get_num_threads(),
                device_name=torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_model(),
                repeats=args.repeats, budget_s=args.budget_s, mem_cap_gib=args.mem_cap_gib,
                N=B * H * W, runtime_s=time.time() - start, load_start=load_start, load_end=os.getloadavg()[0],
                library=f"{commit} (quantizers/*.py sha1 {sha})", library_changed=quantizer_sha() != sha)
    cap_mib = args.mem_cap_gib * 1024 if args.device == "cpu" else None
    checks = targets(rows, cap_mib)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(dict(meta=meta, results=rows, targets=[dict(text=t, met=m) for t, m in checks]), f, indent=1)
    write_markdown(out + ".md", meta, rows, checks)
    for text, ok in checks:
        print(f"{'MET   ' if ok else 'MISSED'} {text}")
    print(f"wrote {out}.json and {out}.md in {meta['runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
