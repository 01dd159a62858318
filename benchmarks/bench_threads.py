"""Intra-op threads and contention: a `tiny` tokenizer training step alone and beside one busy process.

    python benchmarks/bench_threads.py     # -> benchmarks/results/threads.{json,md}

Each setting runs in a fresh subprocess (this file with --worker): the `tiny` tokenizer (vq, 32x32 RGB,
batch 32) doing forward, backward and an Adam step on a fixed random batch; 3 warm-up steps, then the
median of ``--steps`` timed steps. "contended" rows run while one other process spins on one core (a
Python busy loop), as when a second job shares this machine. Settings: torch's own default thread
count, the count `vqgen` picks (the CPUs this process may run on, ``os.sched_getaffinity``), one thread,
and each of those with OpenMP's passive wait policy (``OMP_WAIT_POLICY=PASSIVE``: idle threads sleep
instead of spinning), which `vqgen` sets when it starts.
"""
import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def worker(cfg):
    import torch

    sys.path.insert(0, ROOT)
    from stage1_tokenizer.config import load_tokenizer_config
    from stage1_tokenizer.model import VQTokenizer

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    tc = load_tokenizer_config("tiny", ["quantizer.name=vq"])
    model = VQTokenizer.from_configs(tc.model, tc.quantizer).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(32, tc.model.in_channels, tc.model.resolution, tc.model.resolution) * 2 - 1

    def step():
        recon, q = model(x)
        loss = torch.nn.functional.mse_loss(recon, x) + q.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    times = []
    deadline = time.perf_counter() + cfg["budget_s"]
    while len(times) < cfg["steps"] and (len(times) < 3 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"threads_used": torch.get_num_threads(), "median_s": statistics.median(times), "min_s": min(times),
            "n": len(times)}


def run(setting, contended, args):
    env = {**os.environ}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("OMP_WAIT_POLICY", None)
    if setting["passive"]:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cfg = dict(threads=setting["threads"], steps=args.steps, budget_s=args.budget_s)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if contended else None
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)], env=env,
                           capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.timeout} s"}
    finally:
        if spinner:
            spinner.kill()
            spinner.wait()
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--budget-s", type=float, default=20.0, help="stop timing a setting after this long (>= 3 steps)")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "threads"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    cpus = len(os.sched_getaffinity(0))
    settings = [dict(name="torch default", threads=0, passive=False),
                dict(name=f"affinity ({cpus})", threads=cpus, passive=False),
                dict(name="1 thread", threads=1, passive=False),
                dict(name=f"affinity ({cpus}) + passive wait", threads=cpus, passive=True),
                dict(name="1 thread + passive wait", threads=1, passive=True)]
    start, load_start = time.time(), os.getloadavg()[0]
    rows = []
    for s in settings:
        for contended in (False, True):
            r = dict(setting=s["name"], threads=s["threads"], passive=s["passive"], contended=contended,
                     **run(s, contended, args))
            rows.append(r)
            print(r, flush=True)
    alone = {r["setting"]: r for r in rows if not r["contended"] and "median_s" in r}
    for r in rows:
        if r["contended"] and "median_s" in r and r["setting"] in alone:
            r["slowdown"] = r["median_s"] / alone[r["setting"]]["median_s"]
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), command=shlex.join(["python", *sys.argv]),
                cpus_affinity=cpus, cpu_count=os.cpu_count(), load_start=load_start, load_end=os.getloadavg()[0],
                runtime_s=time.time() - start)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)
    lines = ["# Threads and contention: one `tiny` tokenizer training step", "",
             f"- Date: {meta['date']}; command: `{meta['command']}`; runtime {meta['runtime_s']:.0f} s",
             f"- CPUs this process may run on: {cpus} (os.cpu_count {os.cpu_count()}); 1-min load average "
             f"{load_start:.2f} at start, {meta['load_end']:.2f} at end",
             "- Step: `tiny` tokenizer (vq), batch 32 at 32x32, forward + backward + Adam; median of up to "
             f"{args.steps} steps after 3 warm-up steps, each setting in a fresh process. Contended: while one other "
             "process spins on one core.", "",
             "| setting | threads used | alone ms | contended ms | slowdown |", "|---|---:|---:|---:|---:|"]
    for s in settings:
        a = next((r for r in rows if r["setting"] == s["name"] and not r["contended"]), {})
        c = next((r for r in rows if r["setting"] == s["name"] and r["contended"]), {})
        fmt = lambda r: f"{1e3 * r['median_s']:.0f}" if "median_s" in r else r.get("error", "-")
        lines.append(f"| {s['name']} | {a.get('threads_used', '-')} | {fmt(a)} | {fmt(c)} | "
                     f"{c['slowdown']:.1f}x |" if "slowdown" in c else f"| {s['name']} | - | {fmt(a)} | {fmt(c)} | - |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
