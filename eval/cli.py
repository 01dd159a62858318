"""The ``fid`` subcommand, for a host command line to add with ``register_cli(subparsers)``."""
from __future__ import annotations

import argparse

from .fid import NUM_WORKERS, fid


def _cmd_fid(args: argparse.Namespace) -> int:
    score = fid(args.dir_a, args.dir_b, batch_size=args.batch_size, num_workers=args.num_workers, device=args.device)
    print(f"{score:.4f}")
    return 0


def register_cli(subparsers) -> None:
    """Add ``fid DIR_A DIR_B [--batch-size B] [--num-workers W] [--device D]`` to an argparse subparsers object."""
    p = subparsers.add_parser("fid", help="FID between two image folders (clean-fid 'clean' protocol, offline weights)")
    p.add_argument("dir_a", metavar="DIR_A", help="folder of images (searched recursively)")
    p.add_argument("dir_b", metavar="DIR_B", help="folder of images (searched recursively)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default 8 on a CPU, 64 on a GPU)")
    p.add_argument("--num-workers", type=int, default=NUM_WORKERS,
                   help=f"threads decoding and resizing images (default {NUM_WORKERS}: in the main thread)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=_cmd_fid)
