"""Export trained runs as diffusers pipelines: the tokenizer as a stock ``VQModel``, the LDM as a stock
``LDMPipeline``, the GPT prior as a ``VQGPTPipeline``. All weights are safetensors.

At inference every variant is a frozen lookup: nearest row of a codebook (its ``lookup_space``), with
optional linear maps before and after. Export materialises that codebook into ``VQModel.quantize`` and
folds the maps into ``quant_conv`` / ``post_quant_conv``. Two variants cannot be expressed that way and
are exported as our own ``VQTokenizer`` (a ``ModelMixin`` that round-trips ``save_pretrained``):
``rvq`` (several codebooks whose lookups are summed) and ``gumbel`` (tokens are the argmax of learned
logits, not nearest codes).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel
from torch import nn
from transformers import GPT2LMHeadModel

from stage1_tokenizer.config import to_dict
from stage1_tokenizer.model import VQTokenizer
from stage1_tokenizer.quantizers import ResidualVQ
from stage1_tokenizer.train import load_run

from .vqgpt_pipeline import VQGPTPipeline

SIDECAR = "vqgen.json"  # what the pipeline was made from and how to sample it; ignored by diffusers


def stock_incompatibility(tokenizer: VQTokenizer) -> str | None:
    """Why ``tokenizer`` cannot be a stock ``VQModel`` (None when it can)."""
    q = tokenizer.quantize
    if isinstance(q, ResidualVQ):
        return "rvq sums the lookups of several codebooks; diffusers' VectorQuantizer holds one"
    if not q.nearest_lookup:
        return f"{tokenizer.config.quantizer} tokens are the argmax of learned logits, not nearest codes"
    return None


def _fold_after(conv: nn.Conv2d, linear: nn.Linear | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of the 1x1 conv computing ``linear(conv(x))``."""
    w, b = conv.weight.detach()[:, :, 0, 0], conv.bias.detach()
    if linear is None:
        return w, b
    return linear.weight.detach() @ w, linear.weight.detach() @ b + linear.bias.detach()


def _fold_before(conv: nn.Conv2d, linear: nn.Linear | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of the 1x1 conv computing ``conv(linear(x))``."""
    w, b = conv.weight.detach()[:, :, 0, 0], conv.bias.detach()
    if linear is None:
        return w, b
    return w @ linear.weight.detach(), w @ linear.bias.detach() + b


@torch.no_grad()
def to_vqmodel(tokenizer: VQTokenizer) -> VQModel:
    """A stock ``VQModel`` whose encode-quantise-decode equals the tokenizer's inference path."""
    reason = stock_incompatibility(tokenizer)
    if reason:
        raise ValueError(f"cannot export as a stock VQModel: {reason}")
    cfg = tokenizer.config
    codebook, in_map, out_map = tokenizer.quantize.lookup_space()
    depth = len(cfg.block_out_channels)
    vq = VQModel(in_channels=cfg.in_channels, out_channels=cfg.in_channels,
                 down_block_types=("DownEncoderBlock2D",) * depth, up_block_types=("UpDecoderBlock2D",) * depth,
                 block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                 act_fn=cfg.act_fn, latent_channels=cfg.latent_channels, sample_size=cfg.resolution,
                 num_vq_embeddings=codebook.shape[0], norm_num_groups=cfg.norm_num_groups,
                 vq_embed_dim=codebook.shape[1], scaling_factor=cfg.scaling_factor,
                 mid_block_add_attention=cfg.mid_block_add_attention)
    vq.encoder.load_state_dict(tokenizer.encoder.state_dict())
    vq.decoder.load_state_dict(tokenizer.decoder.state_dict())
    for conv, (w, b) in ((vq.quant_conv, _fold_after(tokenizer.quant_conv, in_map)),
                         (vq.post_quant_conv, _fold_before(tokenizer.post_quant_conv, out_map))):
        conv.weight.copy_(w[:, :, None, None])
        conv.bias.copy_(b)
    vq.quantize.embedding.weight.copy_(codebook.detach())
    return vq.eval()


def export_tokenizer(tokenizer: VQTokenizer):
    """The stock ``VQModel`` when the variant allows it, else the tokenizer itself (hard inference)."""
    if stock_incompatibility(tokenizer) is None:
        return to_vqmodel(tokenizer)
    tokenizer.set_hard_inference(True)
    return tokenizer.eval()


def _prior_run(prior_dir: Path) -> tuple[dict, dict, VQTokenizer, dict]:
    """(run.json, resolved prior config, tokenizer, tokenizer facts) of a finished prior run."""
    run_path = prior_dir / "run.json"
    if not run_path.exists() or not (prior_dir / "config.yaml").exists():
        raise ValueError(f"{prior_dir} is not a finished train-prior run (needs run.json and config.yaml)")
    run = json.loads(run_path.read_text())
    cfg = yaml.safe_load((prior_dir / "config.yaml").read_text())
    tok_cfg, tokenizer = load_run(run["tokenizer"])
    tokenizer.set_hard_inference(True)
    facts = {"quantizer": tok_cfg.quantizer.name, "num_codes": tok_cfg.quantizer.num_codes,
             "quantizer_options": tok_cfg.quantizer.options, "dataset": tok_cfg.data.source,
             "resolution": tok_cfg.model.resolution, "tokenizer_run": run["tokenizer"],
             "stock_vqmodel": stock_incompatibility(tokenizer) is None,
             "not_stock_because": stock_incompatibility(tokenizer),
             "config": {"tokenizer": to_dict(tok_cfg), "prior": cfg}}
    return run, cfg, tokenizer, facts


def _save(pipe, out_dir: Path, sidecar: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / SIDECAR).write_text(json.dumps(sidecar, indent=2))
    return out_dir


def export_gpt(prior_dir: str | Path, out_dir: str | Path) -> Path:
    """A ``VQGPTPipeline`` folder from a finished GPT prior run."""
    prior_dir, out_dir = Path(prior_dir), Path(out_dir)
    run, cfg, tokenizer, facts = _prior_run(prior_dir)
    if run.get("kind") != "gpt":
        raise ValueError(f"{prior_dir} is a {run.get('kind')} run, not a gpt run")
    transformer = GPT2LMHeadModel.from_pretrained(prior_dir / "transformer").eval()
    pipe = VQGPTPipeline(vqvae=export_tokenizer(tokenizer), transformer=transformer, num_codes=run["num_codes"],
                         grid=run["grid"], top_k=run["top_k"], temperature=run["temperature"],
                         num_classes=run["num_classes"])
    return _save(pipe, out_dir, {**facts, "pipeline": "VQGPTPipeline", "prior_run": str(prior_dir.resolve()),
                                 "sampling": {"top_k": run["top_k"], "temperature": run["temperature"]}})


def export_ldm(prior_dir: str | Path, out_dir: str | Path) -> Path:
    """A stock ``LDMPipeline`` folder (vqvae + unet + DDIM scheduler) from a finished LDM prior run."""
    prior_dir, out_dir = Path(prior_dir), Path(out_dir)
    run, cfg, tokenizer, facts = _prior_run(prior_dir)
    if run.get("kind") != "ldm":
        raise ValueError(f"{prior_dir} is a {run.get('kind')} run, not an ldm run")
    pipe = LDMPipeline(vqvae=export_tokenizer(tokenizer), unet=UNet2DModel.from_pretrained(prior_dir / "unet"),
                       scheduler=DDIMScheduler.from_pretrained(prior_dir / "scheduler"))
    sampling = {"num_inference_steps": cfg["ldm"]["num_inference_steps"], "eta": cfg["ldm"]["eta"]}
    return _save(pipe, out_dir, {**facts, "pipeline": "LDMPipeline", "prior_run": str(prior_dir.resolve()),
                                 "sampling": sampling})


def export_prior(prior_dir: str | Path, out_dir: str | Path) -> Path:
    """The pipeline folder of a finished prior run, whichever its kind."""
    run = Path(prior_dir) / "run.json"
    kind = json.loads(run.read_text()).get("kind") if run.exists() else None
    if kind not in EXPORTERS:
        raise ValueError(f"{prior_dir} is not a finished train-prior run")
    return EXPORTERS[kind](prior_dir, out_dir)


EXPORTERS = {"gpt": export_gpt, "ldm": export_ldm}
