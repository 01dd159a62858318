"""The floor of a gFID measurement: real training images scored as if generated, against N other training images.

    python benchmarks/fid_floor.py                    # -> benchmarks/results/fid_floor.{json,md}

FID from a few thousand images is biased upwards (~c (1/N_gen + 1/N_ref)), so "real against other real" at the
demo's counts is far from 0: that value is the best any prior can score there. The 'generated' set is training
images [offset, offset + n) of ``--data``, outside every reference prefix; each reference is the first N training
images, the same cached features `vqgen gfid --ref-images N` uses, and the metrics are the same
``sample_quality`` (FID with its bootstrap interval, KID, precision/recall on equal set sizes).
"""
import argparse
import datetime
import json
import os
import shlex
import sys
import time

import torch

from eval.fid import Features, extract_features
from eval.sample_quality import sample_quality
from pipelines.sample import dataset_features, dataset_images
from stage1_tokenizer.data import build_dataset

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--num-images", type=int, default=1000, help="the 'generated' real images")
    ap.add_argument("--refs", default="1000,2000,3000,5000", help="reference counts, comma-separated")
    ap.add_argument("--offset", type=int, default=6000, help="first training image of the 'generated' set")
    ap.add_argument("--cache-dir", help="FID reference cache (default: this machine's, see `vqgen cache`)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "fid_floor"), help="path without extension")
    args = ap.parse_args()
    refs = sorted(int(r) for r in args.refs.split(","))
    if args.offset < refs[-1]:
        raise SystemExit(f"--offset {args.offset} overlaps the largest reference ({refs[-1]} images)")
    start = time.time()
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), command=shlex.join(["python", *sys.argv]),
                torch=torch.__version__, threads=torch.get_num_threads(), data=args.data, num_images=args.num_images,
                offset=args.offset)
    ref = dataset_features(args.data, args.resolution, args.channels, refs[-1], args.cache_dir)
    end = args.offset + args.num_images
    ds = build_dataset(args.data, args.resolution, args.channels, "train", end)
    gen = extract_features(dataset_images(ds, args.offset, end), num_images=args.num_images)
    rows = {n: sample_quality(gen, Features(ref.array[:n])) for n in refs}
    meta["runtime_s"] = round(time.time() - start, 1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, floor=rows), f, indent=1)
    lines = [f"# The floor of gFID on {args.data}: {args.num_images} real images against N other real images", "",
             f"- Date: {meta['date']}; command: `{meta['command']}`; torch {meta['torch']}, {meta['threads']} threads; "
             f"runtime {meta['runtime_s']:.0f} s",
             f"- 'Generated': training images {args.offset}-{end - 1}; reference: the first N training images "
             "(`vqgen gfid --ref-images N`). FID [bootstrap 95%], KID, precision/recall on equal set sizes.", "",
             "| reference images N | FID [95%] | KID x1e3 | precision / recall |", "|---:|---:|---:|---:|"]
    lines += [f"| {n:,} | {r['fid']:.1f} [{r['fid_ci'][0]:.1f}, {r['fid_ci'][1]:.1f}] | "
              f"{r['kid'] * 1e3:.2f} +- {r['kid_std'] * 1e3:.2f} | {r['precision']:.3f} / {r['recall']:.3f} |"
              for n, r in rows.items()]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
