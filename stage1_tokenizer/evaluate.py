"""``vqgen eval-tokenizer``: reconstruction quality and codebook health of a trained tokenizer run."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from common.atomic import write_atomic
from eval.codebook import MIN_TOKENS_PER_CODE, distortion_per_bit, perplexity, usage, usage_ceiling
from eval.fid import extract_features
from eval.fid_cache import reference_features
from eval.lpips_offline import MIN_SIZE, lpips_distance
from eval.recon import psnr, ssim
from eval.sample_quality import sample_quality

from .data import build_dataset
from .model import VQTokenizer
from .plots import save_recon_grid
from .quantizers.sf_diveq import SFDiVeQ
from .quantizers.stats import code_counts
from .schedules import base_quantizers
from .train import load_run


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


@torch.no_grad()
def reconstruct_all(model: VQTokenizer, dataset, num_images: int, batch_size: int, hard: bool = False):
    """Originals and reconstructions (uint8), code counts and mean squared latent quantisation error."""
    model.set_hard_inference(hard)
    device = next(model.parameters()).device
    loader = DataLoader(torch.utils.data.Subset(dataset, range(min(num_images, len(dataset)))), batch_size=batch_size)
    originals, recons, counts, sq_err, vectors = [], [], None, 0.0, 0
    for x, _ in tqdm(loader, desc="reconstructing", unit="batch"):
        x = x.to(device)
        z = model.encode(x)
        out = model.quantize(z)
        recons.append(to_uint8(model.decode_latents(out.quantized)))
        originals.append(to_uint8(x))
        c = code_counts(out.indices, model.quantize.num_codes)
        counts = c if counts is None else counts + c
        sq_err += (z - out.quantized).pow(2).sum().item()
        vectors += z.numel() // z.shape[1]
    return torch.cat(originals), torch.cat(recons), counts, sq_err / vectors


def _lpips_or_none(orig: torch.Tensor, recon: torch.Tensor, net: str) -> float | None:
    """LPIPS, or None (with a warning) for images smaller than the network's receptive field."""
    if min(orig.shape[2:]) < MIN_SIZE[net]:
        warnings.warn(f"LPIPS-{net} needs images of at least {MIN_SIZE[net]} px; recorded as null")
        return None
    return lpips_distance(orig, recon, net)


def _rfid(orig: torch.Tensor, recon: torch.Tensor, cache_dir, source: str, suffix: str, mode: str) -> dict:
    """rFID with its bootstrap interval and rKID with its std (reconstructions against the originals, FID
    protocol ``mode``); the originals' features come from the FID cache, shared by every run on those images."""
    ref = reference_features(orig, f"heldout-{Path(source).name or source}", orig.shape[-1], len(orig), cache_dir,
                             mode=mode)
    q = sample_quality(extract_features(recon, mode=mode), ref)
    return {f"rfid{suffix}": q["fid"], f"rfid_ci{suffix}": q["fid_ci"], f"rkid{suffix}": q["kid"],
            f"rkid_std{suffix}": q["kid_std"]}


def evaluate_tokenizer(run_dir: str | Path, data: str | None = None, num_images: int = 1000,
                       batch_size: int = 64, cache_dir: str | Path | None = None, fid_mode: str = "clean") -> dict:
    """Write ``eval.json`` and ``eval_recon.png`` into ``run_dir``; returns the metrics.

    Data defaults to the run's own dataset, its held-out split. SF-DiVeQ runs are scored both with
    their continuous (projected) inference and in hard mode (``*_hard``), the mode the priors use.
    ``cache_dir``: the FID cache of the originals' features (default: this machine's); ``fid_mode``: the FID protocol.
    """
    run = Path(run_dir)
    cfg, model = load_run(run)
    source = data or cfg.data.source
    dataset = build_dataset(source, cfg.model.resolution, cfg.model.in_channels, "test", None, cfg.data.holdout)
    modes = [False, True] if any(isinstance(q, SFDiVeQ) for q in base_quantizers(model.quantize)) else [False]
    # the quantizer's own K: fsq's is the product of its levels (1,000 for a configured 1,024)
    result = {"quantizer": cfg.quantizer.name, "num_codes": model.quantize.num_codes, "data": source, "split": "test",
              "fid_mode": fid_mode}
    for hard in modes:
        orig, recon, counts, mse = reconstruct_all(model, dataset, num_images, batch_size, hard)
        suffix = "_hard" if hard and len(modes) > 1 else ""
        result.update({
            **_rfid(orig, recon, cache_dir, source, suffix, fid_mode),
            **{f"lpips_{net}{suffix}": _lpips_or_none(orig, recon, net) for net in ("vgg", "alex")},
            f"ssim{suffix}": ssim(orig, recon), f"psnr{suffix}": psnr(orig, recon),
        })
        if not suffix:
            tokens = int(counts.sum())
            if tokens < MIN_TOKENS_PER_CODE * len(counts):
                warnings.warn(f"held-out usage counted on {tokens} tokens, fewer than 2.3 K = "
                              f"{MIN_TOKENS_PER_CODE * len(counts):.0f}: even uniform use reaches only "
                              f"{usage_ceiling(tokens, len(counts)):.0%}; evaluate more images (--num-images)")
            result.update({"usage": usage(counts), "usage_tokens": tokens,
                           "usage_ceiling": usage_ceiling(tokens, len(counts)), "perplexity": perplexity(counts),
                           "d_per_bit": distortion_per_bit(mse, counts), "latent_mse": mse,
                           "num_images": len(orig), "code_counts": counts.long().tolist()})
            save_recon_grid(orig[:16].float() / 127.5 - 1, recon[:16].float() / 127.5 - 1, run / "eval_recon.png")
    run_info = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    result["usage_epoch"] = run_info.get("usage_epoch")  # Beyond Stationarity's count, from training
    write_atomic(run / "eval.json", json.dumps(result, indent=2))
    return result
