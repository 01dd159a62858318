"""The ``vqgen`` command line."""
from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

from stage1_tokenizer.quantizers import QUANTIZERS, valid_options

DEFAULT_TOKENIZER_PRESET = "tiny"
DEFAULT_SWEEP = "demo"


def _cmd_quantizers(args) -> int:
    for name, cls in QUANTIZERS.items():
        opts = "base, num_quantizers, + the base's options" if name == "rvq" else ", ".join(valid_options(cls))
        print(f"{name:16s} {(cls.__doc__ or '').strip().splitlines()[0]}\n{'':16s} options: {opts}")
    return 0


def _cmd_demo_quantizers(args) -> int:
    from study.toy.compare import ToyConfig, compare

    names = list(QUANTIZERS) if args.quantizers == "all" else args.quantizers.split(",")
    cfg = ToyConfig(quantizers=names, num_codes=args.num_codes, steps=args.steps, seed=args.seed)
    compare(cfg, args.output_dir)
    print(f"wrote {args.output_dir}/report.md, results.json, codebooks.png, usage.png")
    return 0


def _cmd_demo_drift(args) -> int:
    from study.toy.drift import PAPER_RULES, SCENARIOS, DriftConfig, run_drift_demo

    methods = [*PAPER_RULES, *QUANTIZERS] if args.methods == "all" else args.methods.split(",")
    scenarios = list(SCENARIOS) if args.scenarios == "all" else args.scenarios.split(",")
    run_drift_demo(DriftConfig(scenarios=scenarios, methods=methods, epochs=args.epochs, seed=args.seed),
                   args.output_dir)
    print(f"wrote {args.output_dir}/report.md, results.json, frames_<scenario>.png")
    return 0


def _cmd_train_tokenizer(args) -> int:
    from stage1_tokenizer.config import load_tokenizer_config
    from stage1_tokenizer.data_fit import announce, fit_to_data, inspect_data, typed_fields
    from stage1_tokenizer.train import train_tokenizer

    overrides = _with_flags(args, ("quantizer.name", args.quantizer), ("data.source", args.data),
                            ("train.report_to", args.report_to))
    cfg = load_tokenizer_config(args.preset or DEFAULT_TOKENIZER_PRESET, overrides)
    typed = typed_fields(overrides, args.preset and f"--preset {args.preset}")
    cfg, fit = fit_to_data(cfg, inspect_data(cfg.data.source), typed)  # the data decides what the user left open
    announce(fit)
    return _train(partial(train_tokenizer, data_fit=fit), cfg, args, "tokenizer")


def _with_flags(args, *pairs) -> list[str]:
    """The positional ``key=value`` overrides plus those given as flags (max steps, seed, ...)."""
    pairs += (("train.max_steps", args.max_steps), ("train.seed", args.seed))
    return [*args.overrides, *(f"{key}={value}" for key, value in pairs if value is not None)]


def _train(train_fn, cfg, args, what: str) -> int:
    from common.runtime import TrainingDiverged

    try:
        final = train_fn(cfg, args.output_dir, resume=args.resume)
    except TrainingDiverged as e:
        print(f"vqgen: training stopped: {e}", file=sys.stderr)
        return 3
    print(f"{what} weights: {final}")
    return 0


def _cmd_eval_tokenizer(args) -> int:
    from stage1_tokenizer.evaluate import evaluate_tokenizer

    result = evaluate_tokenizer(args.run_dir, args.data, args.num_images, args.batch_size, fid_mode=args.fid_mode)
    shown = {k: v for k, v in result.items() if k != "code_counts"}
    print(json.dumps(shown, indent=2))
    print(f"wrote {args.run_dir}/eval.json and eval_recon.png")
    return 0


def _cmd_encode(args) -> int:
    from stage2_prior.codes import cache_path, encode_run

    cache = encode_run(args.run_dir, args.batch_size)
    print(f"{len(cache.indices)} code grids {tuple(cache.indices.shape[1:])}, K={cache.num_codes}, "
          f"scaling_factor={cache.scaling_factor:.5f} -> {cache_path(args.run_dir)}")
    return 0


def _cmd_train_prior(args) -> int:
    from stage2_prior.config import load_prior_config
    from stage2_prior.train import train_prior

    overrides = _with_flags(args, ("tokenizer", args.tokenizer), ("train.report_to", args.report_to))
    return _train(train_prior, load_prior_config(args.kind, args.preset, overrides), args, f"{args.kind} prior")


def _cmd_export(args) -> int:
    from pipelines.export import export_prior

    print(f"wrote {export_prior(args.prior_dir, args.output_dir, args.dataset_name)}")
    return 0


def _cmd_sample(args) -> int:
    from pipelines.sample import load_pipeline, write_samples

    pipe, sidecar = load_pipeline(args.pipeline_dir)
    out = write_samples(pipe, sidecar, args.num_images, args.output_dir, args.batch_size, args.seed)
    print(f"wrote {args.num_images} images and grid.png to {out}")
    return 0


def _cmd_gfid(args) -> int:
    from pipelines.sample import gfid

    result = gfid(args.pipeline_dir, args.data, args.num_images, args.batch_size, args.seed, args.ref_images,
                  args.cache_dir, args.save_grid, fid_mode=args.fid_mode, guidance_scale=args.guidance_scale)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_fid(args) -> int:
    from eval.fid import fid

    workers = {} if args.num_workers is None else {"num_workers": args.num_workers}
    score = fid(args.dir_a, args.dir_b, batch_size=args.batch_size, device=args.device, mode=args.fid_mode, **workers)
    print(f"{score:.4f}")
    return 0


def _cmd_cache(args) -> int:
    from eval.fid_cache import cache_entries, clear_cache, default_cache_dir

    where = args.cache_dir or default_cache_dir()
    if args.action == "clear":
        removed, busy = clear_cache(where, args.older_than)
        print(f"removed {len(removed)} entries from {where}" +
              (f"; {len(busy)} in use by another process were kept" if busy else ""))
        return 0
    entries = cache_entries(where)
    total = sum(e["bytes"] for e in entries)
    print(f"{where}: {len(entries)} entries, {total / 2**20:.1f} MiB")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"]))
        print(f"  {e.get('name', '?'):<24} {e.get('resolution', '?'):>4}px {e.get('num_images', '?'):>7} images "
              f"{e['bytes'] / 2**20:7.1f} MiB  last used {used}  {Path(e['path']).name}")
    return 0


def _cmd_publish(args) -> int:
    from pipelines.publish import publish

    staged = publish(args.pipeline_dir, args.repo_id, args.private, args.dry_run, args.output_dir,
                     dataset=args.dataset_name)
    if args.dry_run:
        print(f"dry run: nothing uploaded; the folder that would be uploaded is {staged}")
    else:
        print(f"uploaded {staged} to https://huggingface.co/{args.repo_id}")
    return 0


def _cmd_data_emoji(args) -> int:
    from stage1_tokenizer.emoji_set import prepare_emoji

    counts = prepare_emoji(args.tarballs, args.output)
    print(f"wrote {counts['train']} training and {counts['test']} held-out images to {args.output} "
          f"(licences in {args.output}/LICENSES.md)")
    return 0


def _shard(text: str) -> tuple[int, int]:
    """``I/N`` -> (I, N) for ``vqgen sweep --shard``."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes I/N, e.g. 0/2, not {text!r}") from None
    return index, count  # the range is checked by Sweep


def _cmd_sweep(args) -> int:
    from study.sweep import Sweep, load_sweep_config

    overrides = list(args.overrides)
    if args.quantizers:
        names = list(QUANTIZERS) if args.quantizers == "all" else args.quantizers.split(",")
        overrides.append(f"quantizers={json.dumps(names)}")
    for key, value in (("preset", args.preset), ("data", args.data), ("max_steps", args.max_steps),
                       ("report_to", args.report_to)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_sweep_config(args.config or DEFAULT_SWEEP, overrides)
    # a config or tokenizer preset the user named keeps its input shape; the default one yields to the data
    named = [f"--{flag} {value}" for flag, value in (("config", args.config), ("preset", args.preset)) if value]
    named += [item for item in args.overrides if item.split("=", 1)[0].strip() == "preset"]
    sweep = Sweep(cfg, args.output_dir, args.shard, keep_shape=", ".join(named) or None)
    result = sweep.run()
    if sweep.state.is_main_process:
        finished, failed = ", ".join(result["finished"]) or "none", ", ".join(result["failed"]) or "none"
        print(f"finished: {finished}; failed: {failed}; {result['seconds'] / 60:.1f} min. "
              f"Report: {args.output_dir}/report.md" + (f"\nSweep {result['stopped']}." if result["stopped"] else ""))
    return 0 if not result["failed"] else 1


def _cmd_report(args) -> int:
    from study.report import write_report

    write_report(args.run_dirs, args.output_dir, args.title)
    print(f"wrote {args.output_dir}/report.md, results.json and plots")
    return 0


def _cmd_claims(args) -> int:
    from study.claims import write_claims

    print(f"wrote {write_claims(args.run_dirs, args.output)}")
    return 0


def _shipped(package: str, kind: str) -> str:
    """The names of the presets ``package`` ships for ``kind``, for help texts."""
    from common.config_loader import preset_names, presets

    return ", ".join(preset_names(presets(package, kind)))


def _fid_mode(parser: argparse.ArgumentParser) -> None:
    from eval.fid_modes import FID_MODES

    parser.add_argument("--fid-mode", default="clean", choices=FID_MODES,
                        help="FID protocol: clean (default), legacy_tensorflow (the TF resize of the original FID "
                             "code and the ADM evaluator most generation papers report with), legacy_pytorch")


def _run_options(parser: argparse.ArgumentParser, overrides_help: str) -> None:
    """What every training command takes: its run directory, length, resume, seed, tracker and config overrides."""
    parser.add_argument("--output-dir", required=True, help="run directory: config, checkpoints, metrics, samples, weights")
    parser.add_argument("--max-steps", type=int, help="total optimisation steps of the run (overrides train.max_steps)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --output-dir")
    parser.add_argument("--seed", type=int, help="run seed (overrides train.seed)")
    _report_to(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)


def _report_to(parser: argparse.ArgumentParser) -> None:
    from common.tracking import CHOICES

    parser.add_argument("--report-to", choices=CHOICES,
                        help="log losses, lr, usage, perplexity, replacements, drift and sample grids to accelerate's "
                             "trackers (one run per stage; tensorboard under RUN/logs, wandb offline unless WANDB_MODE "
                             "says otherwise; default: the config's train.report_to, none)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vqgen")
    except PackageNotFoundError:
        return "unknown (not installed: pip install the project)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vqgen", description="Which vector quantizer makes the best image tokenizer?")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("quantizers", help="list the quantizer variants and their options").set_defaults(func=_cmd_quantizers)
    tt = sub.add_parser("train-tokenizer", help="train a VQ tokenizer with any quantizer variant",
                        description="Train (or resume) a stage-1 VQ tokenizer. Everything in the preset can be "
                                    "overridden with key=value, e.g. train.lr=1e-4 quantizer.options.noise_std=1e-2.")
    tt.add_argument("--quantizer", help=f"variant: {', '.join(QUANTIZERS)} (default: the preset's)")
    tt.add_argument("--preset",
                    help=f"a shipped preset ({_shipped('stage1_tokenizer', 'tokenizer')}) or a .yaml path; a named "
                         f"preset keeps its channels and resolution (default: {DEFAULT_TOKENIZER_PRESET}, with "
                         "channels, resolution and depth from the data)")
    tt.add_argument("--data", help="mnist | shapes | a folder of images (train/ and test/ subfolders are its splits) "
                                   "| hf:<imagefolder dir> (default: the preset's)")
    _run_options(tt, "config overrides, dotted keys")
    tt.set_defaults(func=_cmd_train_tokenizer)
    ev = sub.add_parser("eval-tokenizer", help="rFID, LPIPS, SSIM, PSNR and codebook health of a tokenizer run")
    ev.add_argument("run_dir", help="a finished train-tokenizer run directory")
    ev.add_argument("--data", help="image source (default: the run's own dataset, its held-out split)")
    ev.add_argument("--num-images", type=int, default=1000, help="held-out images to score (default 1000)")
    ev.add_argument("--batch-size", type=int, default=64)
    _fid_mode(ev)
    ev.set_defaults(func=_cmd_eval_tokenizer)
    en = sub.add_parser("encode", help="cache a tokenizer run's codes (indices + quantised latents) for stage 2",
                        description="Encode the run's training set once with the frozen tokenizer; writes "
                                    "RUN_DIR/codes/train.safetensors and the tokenizer's scaling_factor.")
    en.add_argument("run_dir", help="a finished train-tokenizer run directory")
    en.add_argument("--batch-size", type=int, default=256)
    en.set_defaults(func=_cmd_encode)
    tp = sub.add_parser("train-prior", help="train a GPT prior or a latent diffusion UNet on a tokenizer's codes",
                        description="Train (or resume) a stage-2 prior on the frozen codes of a tokenizer run (encoded "
                                    "on demand), from a shipped preset plus key=value overrides.")
    tp.add_argument("--tokenizer", required=True, help="the stage-1 run directory")
    tp.add_argument("--kind", required=True, choices=["gpt", "ldm"])
    tp.add_argument("--preset", default="tiny", help=f"gpt: {_shipped('stage2_prior', 'gpt')}; ldm: "
                                                     f"{_shipped('stage2_prior', 'ldm')} (or a .yaml path; default tiny)")
    _run_options(tp, "config overrides, e.g. gpt.n_layer=8")
    tp.set_defaults(func=_cmd_train_prior)
    ex = sub.add_parser("export", help="export a finished prior run as a diffusers pipeline folder")
    ex.add_argument("prior_dir", help="a finished train-prior run (gpt -> VQGPTPipeline, ldm -> LDMPipeline)")
    ex.add_argument("--output-dir", required=True)
    ex.add_argument("--dataset-name", help="name of the training data in the sidecar and card: a Hub dataset id "
                                            "(e.g. ylecun/mnist; linked on the Hub) or a plain name (default: the "
                                            "Hub id of bundled mnist, else the data folder's last component)")
    ex.set_defaults(func=_cmd_export)
    sa = sub.add_parser("sample", help="sample images from an exported pipeline folder")
    sa.add_argument("pipeline_dir")
    sa.add_argument("--num-images", type=int, default=64)
    sa.add_argument("--output-dir", required=True)
    sa.add_argument("--batch-size", type=int, default=32)
    sa.add_argument("--seed", type=int, default=0)
    sa.set_defaults(func=_cmd_sample)
    gf = sub.add_parser("gfid", help="generation FID of a pipeline against its training set's cached statistics")
    gf.add_argument("pipeline_dir")
    gf.add_argument("--data", help="image source (default: the dataset the pipeline was trained on)")
    gf.add_argument("--num-images", type=int, default=1000, help="samples to score (default 1000)")
    gf.add_argument("--ref-images", type=int, help="training images in the reference statistics (default: --num-images)")
    gf.add_argument("--batch-size", type=int, default=32)
    gf.add_argument("--seed", type=int, default=0)
    gf.add_argument("--cache-dir", help="FID reference cache (default: this machine's, see `vqgen cache`)")
    _fid_mode(gf)
    gf.add_argument("--save-grid", help="also write a grid of the first 64 samples (8 per class) to this PNG path")
    gf.add_argument("--guidance-scale", type=float, help="class-conditional pipelines: the classifier-free guidance "
                    "scale (default: the pipeline's; 1: none); classes are sampled in turn")
    gf.set_defaults(func=_cmd_gfid)
    ca = sub.add_parser("cache", help="list or clear this machine's FID reference cache (shared by every run and sweep)")
    ca.add_argument("action", nargs="?", choices=["list", "clear"], default="list")
    ca.add_argument("--older-than", type=float, metavar="DAYS", help="clear: only entries unused for DAYS days")
    ca.add_argument("--cache-dir", help="another cache folder (default: $VQGEN_CACHE/fid, else "
                                        "$XDG_CACHE_HOME/vqgen/fid, else ~/.cache/vqgen/fid)")
    ca.set_defaults(func=_cmd_cache)
    pb = sub.add_parser("publish", help="upload a pipeline folder with a model card to the Hugging Face Hub")
    pb.add_argument("pipeline_dir")
    pb.add_argument("--repo-id", required=True, help="OWNER/NAME")
    pb.add_argument("--private", action="store_true")
    pb.add_argument("--dry-run", action="store_true", help="write the folder that would be uploaded; upload nothing")
    pb.add_argument("--output-dir", help="where --dry-run writes the folder (default: a new temporary folder)")
    pb.add_argument("--dataset-name", help="rename the training data in the card and sidecar: a Hub dataset id "
                                           "(linked on the Hub) or a plain name (default: the export's name)")
    pb.set_defaults(func=_cmd_publish)
    sw = sub.add_parser("sweep", help="the whole study: tokenizer, evaluation, GPT + LDM priors, export, gFID, report",
                        description="Train and score every chosen quantizer end to end; finished stages are skipped, "
                                    "a killed sweep resumes. Sweep settings: a shipped preset + key=value overrides.")
    sw.add_argument("--config",
                    help=f"sweep preset ({_shipped('study', 'sweep')}) or a .yaml path; a named config keeps its "
                         f"tokenizer's channels and resolution (default: {DEFAULT_SWEEP}, with the tokenizer's "
                         "channels, resolution and depth from the data)")
    sw.add_argument("--output-dir", default="runs/sweep")
    sw.add_argument("--quantizers", help="comma-separated variants, or 'all' (default: the sweep preset's)")
    sw.add_argument("--preset", help="tokenizer preset, which keeps its channels and resolution (default: the sweep "
                                     "preset's)")
    sw.add_argument("--data", help="mnist | shapes | a folder of images | hf:<dir> (default: the sweep preset's)")
    sw.add_argument("--max-steps", type=int, help="cap every training stage at N steps (smoke runs)")
    sw.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                    help="run only every N-th run, starting at run I (0-based), so N sweeps sharing one archive "
                         "(processes or machines) split a study; each reports every run archived so far")
    _report_to(sw)
    sw.add_argument("overrides", nargs="*", metavar="key=value", help="sweep config overrides, e.g. gfid_images=500")
    sw.set_defaults(func=_cmd_sweep)
    rp = sub.add_parser("report", help="report.md, results.json and plots from run directories")
    rp.add_argument("run_dirs", nargs="+", help="tokenizer run directories (evaluated ones carry eval.json)")
    rp.add_argument("--output-dir", required=True)
    rp.add_argument("--title", default="Tokenizer comparison")
    rp.set_defaults(func=_cmd_report)
    cl = sub.add_parser("claims", help="the papers' claims (Beyond Stationarity, DiVeQ, NSVQ 2026) against run results",
                        description="Compare variants at equal K over seeds (Welch's t-test) for the study's three "
                                    "claims; write a markdown table.")
    cl.add_argument("run_dirs", nargs="+", help="evaluated run directories, e.g. docs/study/runs/*")
    cl.add_argument("--output", required=True, help="markdown file to write, e.g. docs/study/claims.md")
    cl.set_defaults(func=_cmd_claims)
    fd = sub.add_parser("fid", help="FID between two image folders (clean-fid's protocols, offline weights)")
    fd.add_argument("dir_a", metavar="DIR_A", help="folder of images (searched recursively)")
    fd.add_argument("dir_b", metavar="DIR_B", help="folder of images (searched recursively)")
    fd.add_argument("--batch-size", type=int, help="images per forward pass (default 8 on a CPU, 64 on a GPU)")
    fd.add_argument("--num-workers", type=int, help="threads decoding and resizing images (default: in the main thread)")
    fd.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    _fid_mode(fd)
    fd.set_defaults(func=_cmd_fid)
    data = sub.add_parser("data", help="build a data set the project ships a recipe for")
    data_sub = data.add_subparsers(dest="dataset", required=True)
    de = data_sub.add_parser("emoji", help="3,812 distinct 64x64 colour emoji (Noto + Twemoji) from npm tarballs",
                             description="Build the emoji set from the npm tarballs emoji-datasource-google and "
                                         "emoji-datasource-twitter (fetch them with `npm pack`, or `make data-emoji`)")
    de.add_argument("--tarballs", default="data/npm", help="folder holding the two .tgz files (default data/npm)")
    de.add_argument("--output", default="data/emoji", help="folder to create (default data/emoji)")
    de.set_defaults(func=_cmd_data_emoji)
    demo = sub.add_parser("demo", help="small demonstrations that run in minutes on a CPU")
    demo_sub = demo.add_subparsers(dest="demo", required=True)
    dq = demo_sub.add_parser("quantizers", help="compare every quantizer on a drifting 2-D stream")
    dq.add_argument("--output-dir", default="runs/demo", help="where report.md, results.json and PNGs go")
    dq.add_argument("--quantizers", default="all", help="comma-separated names, or 'all' (default)")
    dq.add_argument("--num-codes", type=int, default=16, help="codebook size K (default 16)")
    dq.add_argument("--steps", type=int, default=600, help="training steps per quantizer (default 600)")
    dq.add_argument("--seed", type=int, default=0)
    dq.set_defaults(func=_cmd_demo_quantizers)
    dd = demo_sub.add_parser("drift", help="Beyond Stationarity's toy drift demos (EMA vs NS-VQ online, every variant)",
                             description="Translation, expansion, shrink and split streams (Suppl. 11); the paper's "
                                         "EMA and NS-VQ online rules plus every registry variant on the same stream.")
    dd.add_argument("--output-dir", default="runs/drift")
    dd.add_argument("--scenarios", default="all", help="comma-separated: translation, expansion, shrink, split")
    dd.add_argument("--methods", default="all", help="comma-separated: ema-online, ns-vq-online, any variant")
    dd.add_argument("--epochs", type=int, default=20)
    dd.add_argument("--seed", type=int, default=0)
    dd.set_defaults(func=_cmd_demo_drift)
    return p


THREADS_HELP = ("torch intra-op threads (default: one per CPU this process may run on). Beside another busy "
                "process, fewer threads run faster (benchmarks/bench_threads.py)")


def _add_threads(parser: argparse.ArgumentParser) -> None:
    """``--threads`` on ``parser`` and every subcommand below it, so it may stand before or after the command."""
    parser.add_argument("--threads", type=int, default=argparse.SUPPRESS, help=THREADS_HELP)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_threads(sub)


def main(argv: list[str] | None = None) -> int:
    from common.runtime import set_threads

    parser = build_parser()
    _add_threads(parser)
    args = parser.parse_args(argv)
    try:
        set_threads(getattr(args, "threads", None))
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # bad user input: one clear line, no traceback
        print(f"vqgen: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or an unwritable folder: one line saying what, where and how much
        from common.atomic import disk_error_line

        if (line := disk_error_line(e)) is None:
            raise
        print(f"\nvqgen: error: {line}", file=sys.stderr)  # on its own line after a progress bar cut short
        return 1


if __name__ == "__main__":
    sys.exit(main())
