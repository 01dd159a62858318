"""Images per second of FID feature extraction (decode + clean resize to 299 + Inception), eval.fid beside clean-fid.

    python benchmarks/bench_fid.py                      # -> benchmarks/results/fid_features.{json,md}
    python benchmarks/bench_fid.py --num-images 64      # quicker, batch sizes above 64 are skipped

The same folder of procedural 64x64 PNGs goes through ``eval.fid.extract_features`` at every batch size and torch
thread count (1, 2 and torch's default), and through clean-fid's own loop (``cleanfid.fid.get_folder_features``
with the same network as custom extractor, mode="clean", num_workers=0) at each thread count with its compute_fid
default batch of 32. Each run is timed once after a warm-up batch, so a busy machine shows up as noise: the load
average is recorded beside every row.
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from eval.fid import extract_features, image_files, read_resized
from eval.inception import load_inception

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH_SIZES = [32, 64, 128]
CLEANFID_BATCH = 32


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def make_folder(path, n):
    """n procedural 64x64 RGB PNGs: random plane waves per channel."""
    rng = np.random.default_rng(0)
    yy, xx = np.meshgrid(np.linspace(0, 1, 64), np.linspace(0, 1, 64), indexing="ij")
    for i in range(n):
        f, p = rng.uniform(3, 23, (3, 2)), rng.uniform(0, 6.28, 3)
        img = 0.5 + 0.5 * np.sin(f[:, :1, None] * xx + f[:, 1:, None] * yy + p[:, None, None])
        Image.fromarray((img.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(f"{path}/{i:04d}.png")
    return path


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def write_markdown(path, meta, rows, best, best_default):
    lines = [
        "# FID feature extraction throughput", "",
        f"- Date: {meta['date']}",
        f"- Command: `{meta['command']}`",
        f"- CPU: {meta['cpu']}, {meta['cores']} cores; torch {meta['torch']} (default {meta['default_threads']} "
        f"threads); device {meta['device']}; 1-min load average {meta['load_start']:.2f} at start, "
        f"{meta['load_end']:.2f} at end",
        f"- Input: {meta['num_images']} PNGs, 64x64, one folder; clean resize to 299 then Inception pool3. "
        f"Decode + resize alone: {meta['load_ms']:.1f} ms per image in one thread.",
        "- Each row is one timed pass over the folder after a warm-up batch; `eval.fid` is "
        "`extract_features(folder, batch_size=B, num_workers=0)`, `clean-fid` is `get_folder_features(folder, "
        "model=<same network>, mode=\"clean\", num_workers=0, batch_size=B)`.",
        "- `load` is the 1-min load average after the row: above the core count another process competes, and "
        "torch's threads then wait on each other at every layer, which favours fewer threads.", "",
        "| loop | torch threads | batch | seconds | images/s | load |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['loop']} | {r['threads']} | {r['batch_size']} | {r['seconds']:.1f} | {r['images_per_s']:.2f} "
              f"| {r['load']:.2f} |" for r in rows]
    lines += ["", f"Fastest eval.fid setting: batch {best['batch_size']}, {best['threads']} torch threads "
                  f"({best['images_per_s']:.2f} images/s); at torch's default {meta['default_threads']} threads: "
                  f"batch {best_default['batch_size']} ({best_default['images_per_s']:.2f} images/s)."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "fid_features"), help="path without extension")
    args = ap.parse_args()
    from cleanfid.fid import get_folder_features

    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                command=shlex.join([os.path.relpath(sys.executable), *sys.argv]), cpu=cpu_model(),
                cores=os.cpu_count(), torch=torch.__version__, default_threads=torch.get_num_threads(),
                device=args.device, num_images=args.num_images, load_start=os.getloadavg()[0])
    model = load_inception(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(tmp, args.num_images)
        files = image_files(folder)
        meta["load_ms"] = 1000 * timed(lambda: [read_resized(p) for p in files]) / len(files)
        for threads in sorted({1, 2, meta["default_threads"]}):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                model(torch.zeros(4, 3, 299, 299, device=args.device))  # warm-up
            runs = [("eval.fid", b, lambda b=b: extract_features(folder, batch_size=b, num_workers=0,
                                                                 device=args.device, progress=False))
                    for b in BATCH_SIZES if b <= args.num_images]
            runs.append(("clean-fid", CLEANFID_BATCH,
                         lambda: get_folder_features(folder, model, num_workers=0, batch_size=CLEANFID_BATCH,
                                                     device=torch.device(args.device), mode="clean", verbose=False)))
            for loop, batch, fn in runs:
                seconds = timed(fn)
                rows.append(dict(loop=loop, threads=threads, batch_size=batch, seconds=seconds,
                                 images_per_s=args.num_images / seconds, load=os.getloadavg()[0]))
                print(f"{loop:9s} threads={threads} batch={batch:<4d} {seconds:6.1f} s "
                      f"{args.num_images / seconds:6.2f} img/s", flush=True)
    meta["load_end"] = os.getloadavg()[0]
    ours = [r for r in rows if r["loop"] == "eval.fid"]
    best = max(ours, key=lambda r: r["images_per_s"])
    best_default = max((r for r in ours if r["threads"] == meta["default_threads"]), key=lambda r: r["images_per_s"])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows, fastest=best, fastest_at_default_threads=best_default), f, indent=1)
    write_markdown(args.out + ".md", meta, rows, best, best_default)
    print(f"fastest: batch {best['batch_size']}, {best['threads']} threads; at the default threads: batch "
          f"{best_default['batch_size']}; wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
