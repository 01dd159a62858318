"""FID feature throughput (decode + clean resize to 299 + Inception pool3), side by side in one run.

    python benchmarks/bench_fid.py                    # -> benchmarks/results/fid_features.{json,md}

Three loops over the same folder of procedural 64x64 PNGs, alternated ``--repeats`` times after a warm-up,
at this process's thread count and one batch size:
  eval.fid    ``extract_features(folder)``: the decoded (B, H, W, 3) batch goes in as a channels-last view, at the
              device's default batch (8 on a CPU);
  NCHW        the same loop with the batch made contiguous NCHW first, at batch 64: eval.fid's earlier loop;
  clean-fid   ``cleanfid.fid.get_folder_features`` with the same network as its custom extractor, mode "clean",
              at eval.fid's batch.
The ratio of the best pass of each loop is the speed-up. Same numbers: FID between this folder and a second
one, from eval.fid's features and from clean-fid's ``compute_fid`` on the same folders and network.
"""
import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import eval.fid as fid_module
from eval.fid import extract_features, fid_from_features
from eval.inception import load_inception

HERE = os.path.dirname(os.path.abspath(__file__))


def make_folder(path, n, seed):
    """n procedural 64x64 RGB PNGs: random plane waves per channel."""
    os.makedirs(path)
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, 64), np.linspace(0, 1, 64), indexing="ij")
    for i in range(n):
        f, p = rng.uniform(3, 23, (3, 2)), rng.uniform(0, 6.28, 3)
        img = 0.5 + 0.5 * np.sin(f[:, :1, None] * xx + f[:, 1:, None] * yy + p[:, None, None])
        Image.fromarray((img.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(f"{path}/{i:04d}.png")
    return path


class Contiguous(torch.nn.Module):
    """The network fed a contiguous NCHW copy of its input: the layout eval.fid used before channels-last."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.contiguous())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, help="eval.fid's and clean-fid's batch (default: eval.fid's for the device)")
    ap.add_argument("--before-batch-size", type=int, default=64, help="the NCHW loop's batch (eval.fid's old default)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "fid_features"), help="path without extension")
    args = ap.parse_args()
    from cleanfid.fid import compute_fid, get_folder_features

    n, device = args.num_images, args.device
    b, b0 = args.batch_size or fid_module.default_batch_size(device), args.before_batch_size
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                command=shlex.join(["python", *sys.argv]), torch=torch.__version__,
                threads=torch.get_num_threads(), device=device, num_images=n,
                load_start=os.getloadavg()[0])
    meta.update(batch_size=b, before_batch_size=b0)
    model = load_inception(device)
    before = Contiguous(model)
    real_load = fid_module.load_inception
    loops = {
        "eval.fid": lambda: extract_features(folder, batch_size=b, device=device, progress=False),
        "NCHW": lambda: extract_features(folder, batch_size=b0, device=device, progress=False),
        "clean-fid": lambda: get_folder_features(folder, model, num_workers=0, batch_size=b,
                                                 device=torch.device(device), mode="clean", verbose=False),
    }
    times = {name: [] for name in loops}
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        folder, other = make_folder(f"{tmp}/a", n, 0), make_folder(f"{tmp}/b", n, 1)
        with torch.inference_mode():
            model(torch.zeros(4, 3, 299, 299, device=device))  # warm-up
        for _ in range(args.repeats):
            for name, fn in loops.items():
                fid_module.load_inception = (lambda d: before) if name == "NCHW" else real_load
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
                print(f"{name:9s} {n / times[name][-1]:6.2f} images/s", flush=True)
        fid_module.load_inception = real_load
        ours = fid_from_features(extract_features(folder, batch_size=b, device=device, progress=False),
                                 extract_features(other, batch_size=b, device=device, progress=False))
        theirs = float(compute_fid(folder, other, mode="clean", custom_feat_extractor=model, num_workers=0,
                                   batch_size=b, device=torch.device(device), verbose=False))
    best = {name: n / min(t) for name, t in times.items()}
    meta.update(load_end=os.getloadavg()[0], runtime_s=time.time() - start)
    result = dict(meta=meta, images_per_s=best, runs_s=times,
                  speedup_vs_nchw=best["eval.fid"] / best["NCHW"], speedup_vs_cleanfid=best["eval.fid"] / best["clean-fid"],
                  fid_eval=ours, fid_cleanfid=theirs, fid_rel_diff=abs(ours - theirs) / abs(theirs))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    lines = ["# FID feature extraction throughput, side by side", "",
             f"- Date: {meta['date']}; command: `{meta['command']}`; torch {meta['torch']}, {meta['threads']} threads, "
             f"device {device}; 1-min load average {meta['load_start']:.2f} at start, {meta['load_end']:.2f} at end; "
             f"runtime {meta['runtime_s']:.0f} s",
             f"- {n} procedural 64x64 PNGs, batch {b} (NCHW: {b0}); the three loops alternated {args.repeats} times, best pass each "
             "(see the docstring of `benchmarks/bench_fid.py`).", "",
             "| loop | images/s (best) | passes (s) |", "|---|---:|---|"]
    lines += [f"| {name} | {best[name]:.2f} | {', '.join(f'{t:.1f}' for t in times[name])} |" for name in loops]
    lines += ["", f"- eval.fid vs NCHW (before): **{result['speedup_vs_nchw']:.2f}x** (target 1.3x: "
                  f"{'MET' if result['speedup_vs_nchw'] >= 1.3 else 'MISSED'}); vs clean-fid's loop: "
                  f"{result['speedup_vs_cleanfid']:.2f}x",
              f"- Same numbers: FID(a, b) {ours:.6f} from eval.fid, {theirs:.6f} from clean-fid's compute_fid: relative "
              f"difference {result['fid_rel_diff']:.1e} (target <= 1e-4: {'MET' if result['fid_rel_diff'] <= 1e-4 else 'MISSED'})"]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[-2:]))


if __name__ == "__main__":
    main()
