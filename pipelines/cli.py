"""The ``vqgen`` command line."""
from __future__ import annotations

import argparse
import sys

from stage1_tokenizer.quantizers import QUANTIZERS, valid_options


def _cmd_quantizers(args) -> int:
    for name, cls in QUANTIZERS.items():
        opts = "base, num_quantizers, + the base's options" if name == "rvq" else ", ".join(valid_options(cls))
        print(f"{name:16s} {(cls.__doc__ or '').strip().splitlines()[0]}\n{'':16s} options: {opts}")
    return 0


def _cmd_demo_quantizers(args) -> int:
    from stage1_tokenizer.toy import ToyConfig, compare

    names = list(QUANTIZERS) if args.quantizers == "all" else args.quantizers.split(",")
    cfg = ToyConfig(quantizers=names, num_codes=args.num_codes, steps=args.steps, seed=args.seed)
    compare(cfg, args.output_dir)
    print(f"wrote {args.output_dir}/report.md, results.json, codebooks.png, usage.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vqgen", description="Which vector quantizer makes the best image tokenizer?")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("quantizers", help="list the quantizer variants and their options").set_defaults(func=_cmd_quantizers)
    demo = sub.add_parser("demo", help="small demonstrations that run in minutes on a CPU")
    demo_sub = demo.add_subparsers(dest="demo", required=True)
    dq = demo_sub.add_parser("quantizers", help="compare every quantizer on a drifting 2-D stream")
    dq.add_argument("--output-dir", default="runs/demo", help="where report.md, results.json and PNGs go")
    dq.add_argument("--quantizers", default="all", help="comma-separated names, or 'all' (default)")
    dq.add_argument("--num-codes", type=int, default=16, help="codebook size K (default 16)")
    dq.add_argument("--steps", type=int, default=600, help="training steps per quantizer (default 600)")
    dq.add_argument("--seed", type=int, default=0)
    dq.set_defaults(func=_cmd_demo_quantizers)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad user input: one clear line, no traceback
        print(f"vqgen: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
