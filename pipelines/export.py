"""Export trained runs as diffusers pipelines: the tokenizer as a stock ``VQModel``, the LDM as a stock
``LDMPipeline``, the GPT prior as a ``VQGPTPipeline``. All weights are safetensors.

At inference every variant is a frozen lookup: nearest row of a codebook (its ``lookup_space``), with
optional linear maps before and after. Export materialises that codebook into ``VQModel.quantize`` and
folds the maps into ``quant_conv`` / ``post_quant_conv`` (IBQ's argmax becomes a nearest-code lookup in its
augmented table). Three variants cannot be expressed that way and are exported as a ``VQLookupTokenizer``:
``rvq`` (several codebooks whose lookups are summed), ``gumbel`` (tokens are the argmax of learned logits,
not nearest codes) and ``fsq`` (a nonlinear bound before the rounding).

Code that is not stock diffusers travels with the folder as diffusers' remote code: the self-contained
modules ``vqgpt_pipeline.py`` (the folder's root, ``_class_name: [module, class]``) and
``vqvae/lookup_tokenizer.py`` are copied verbatim from vqgen's own source, so
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` runs vqgen's exact classes without vqgen.
"""
from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import torch
import yaml
from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel
from torch import nn
from transformers import GPT2LMHeadModel

from common.atomic import write_atomic
from common.config_loader import to_dict
from stage1_tokenizer import lookup_tokenizer
from stage1_tokenizer.data import BUILTIN_SOURCES
from stage1_tokenizer.lookup_tokenizer import VQLookupTokenizer
from stage1_tokenizer.model import VQTokenizer
from stage1_tokenizer.quantizers import ResidualVQ
from stage1_tokenizer.train import load_run
from stage2_prior import cond_ldm_pipeline, vqgpt_pipeline
from stage2_prior.cond_ldm_pipeline import ClassConditionalLDMPipeline
from stage2_prior.vqgpt_pipeline import VQGPTPipeline

from .redact import dataset_name, find_local_paths, local_roots, redact

SIDECAR = "vqgen.json"  # what the pipeline was made from and how to sample it; ignored by diffusers


def stock_incompatibility(tokenizer: VQTokenizer) -> str | None:
    """Why ``tokenizer`` cannot be a stock ``VQModel`` (None when it can)."""
    q = tokenizer.quantize
    if isinstance(q, ResidualVQ):
        return "rvq sums the lookups of several codebooks; diffusers' VectorQuantizer holds one"
    if not q.nearest_lookup:
        return f"{tokenizer.config.quantizer} tokens are the argmax of learned logits, not nearest codes"
    if not q.linear_lookup:
        return (f"{tokenizer.config.quantizer} bounds latents with a nonlinear map before rounding; "
                "VQModel's maps are linear")
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
    """A stock ``VQModel`` whose encode-quantise-decode equals the tokenizer's inference path; a tokenizer with
    ``config.latents_mean`` (a centred LDM's) gets its lookup space translated by minus that mean, so the stock
    ``decode`` of centred latents re-quantises to the same codes and images (nearest codes are translation-invariant)."""
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
    if cfg.latents_mean is not None:
        mean = torch.tensor(cfg.latents_mean, dtype=codebook.dtype)
        vq.quant_conv.bias.sub_(mean)
        vq.quantize.embedding.weight.sub_(mean)
        vq.post_quant_conv.bias.add_(vq.post_quant_conv.weight[:, :, 0, 0] @ mean)
    return vq.eval()


@torch.no_grad()
def to_lookup_tokenizer(tokenizer: VQTokenizer) -> VQLookupTokenizer:
    """The self-contained inference model of a variant without a stock form (rvq, gumbel, fsq): same tokens and decode."""
    cfg, q = tokenizer.config, tokenizer.quantize
    stages = list(q.stages) if isinstance(q, ResidualVQ) else [q]
    parts = []
    for stage in stages:
        if stage.nearest_lookup:
            codebook, in_map, out_map = stage.lookup_space()
            parts.append((codebook, in_map, out_map, None))
        else:
            parts.append((stage.effective_codebook(), None, None, stage.to_logits))
    codebook, in_map, out_map, logits = parts[0]
    model = VQLookupTokenizer(in_channels=cfg.in_channels, sample_size=cfg.resolution,
                              block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                              latent_channels=cfg.latent_channels, vq_embed_dim=cfg.vq_embed_dim,
                              norm_num_groups=cfg.norm_num_groups, act_fn=cfg.act_fn,
                              mid_block_add_attention=cfg.mid_block_add_attention, num_codes=codebook.shape[0],
                              code_dim=codebook.shape[1], num_quantizers=len(stages),
                              residual=isinstance(q, ResidualVQ), in_map=in_map is not None,
                              out_map=out_map is not None, logits=logits is not None,
                              scaling_factor=cfg.scaling_factor, latents_mean=cfg.latents_mean,
                              levels=None if stages[0].linear_lookup else stages[0].levels.tolist())
    for name in ("encoder", "quant_conv", "post_quant_conv", "decoder"):
        getattr(model, name).load_state_dict(getattr(tokenizer, name).state_dict())
    for target, stage, (codebook, in_map, out_map, logits) in zip(model.stages, stages, parts):
        target.codebook.copy_(codebook.detach())
        if target.edges is not None:  # fsq: its bound as cell edges
            target.edges.copy_(stage.edges)
        for name, source in (("in_map", in_map), ("out_map", out_map), ("to_logits", logits)):
            if source is not None:
                if not isinstance(source, nn.Linear):
                    raise TypeError(f"{name} of {cfg.quantizer} is a {type(source).__name__}, not a linear map")
                getattr(target, name).load_state_dict(source.state_dict())
    return model.eval()


def export_tokenizer(tokenizer: VQTokenizer):
    """The stock ``VQModel`` when the variant allows it, else its ``VQLookupTokenizer``."""
    if stock_incompatibility(tokenizer) is None:
        return to_vqmodel(tokenizer)
    return to_lookup_tokenizer(tokenizer.eval())


def _prior_run(prior_dir: Path, dataset: str | None = None) -> tuple[dict, dict, VQTokenizer, dict]:
    """(run.json, resolved prior config, tokenizer, tokenizer facts) of a finished prior run; the facts name the
    dataset (``dataset``, else the Hub id of a bundled set or a folder's last component) and hold no local path."""
    run_path = prior_dir / "run.json"
    if not run_path.exists() or not (prior_dir / "config.yaml").exists():
        raise ValueError(f"{prior_dir} is not a finished train-prior run (needs run.json and config.yaml)")
    run = json.loads(run_path.read_text())
    cfg = yaml.safe_load((prior_dir / "config.yaml").read_text())
    tok_cfg, tokenizer = load_run(run["tokenizer"])
    tokenizer.set_hard_inference(True)
    source = tok_cfg.data.source
    facts = {"quantizer": tok_cfg.quantizer.name, "num_codes": tok_cfg.quantizer.num_codes,
             "quantizer_options": tok_cfg.quantizer.options, "dataset": dataset_name(source, dataset),
             "data_source": source if source in BUILTIN_SOURCES else None,
             "resolution": tok_cfg.model.resolution, "channels": tok_cfg.model.in_channels,
             "tokenizer_run": run["tokenizer"],
             "prior_run": str(prior_dir), "stock_vqmodel": stock_incompatibility(tokenizer) is None,
             "not_stock_because": stock_incompatibility(tokenizer),
             "config": {"tokenizer": to_dict(tok_cfg), "prior": cfg}}
    return run, cfg, tokenizer, redact(facts)


REMOTE_MODULES = {VQGPTPipeline: vqgpt_pipeline, VQLookupTokenizer: lookup_tokenizer,
                  ClassConditionalLDMPipeline: cond_ldm_pipeline}


def _ship_remote_code(out_dir: Path, pipe) -> None:
    """Point ``model_index.json`` at module files inside the folder and copy vqgen's own modules there verbatim."""
    index_path = out_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    for name, obj in [("_class_name", type(pipe)), *((k, type(v)) for k, v in pipe.components.items())]:
        module = REMOTE_MODULES.get(obj)
        if module is None:
            continue
        module_name = module.__name__.rsplit(".", 1)[-1]
        folder = out_dir if name == "_class_name" else out_dir / name
        shutil.copyfile(inspect.getsourcefile(module), folder / f"{module_name}.py")
        index[name] = [module_name, obj.__name__]
    write_atomic(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")


def _drop_name_or_path(out_dir: Path) -> None:
    """diffusers writes ``_name_or_path`` (the folder a component was loaded from) into component configs: a
    local path, of no use to whoever loads the export."""
    for path in out_dir.glob("*/*config.json"):
        config = json.loads(path.read_text())
        if config.pop("_name_or_path", None) is not None:
            write_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save(pipe, out_dir: Path, sidecar: dict, sources: list) -> Path:
    """Save ``pipe`` with its remote code and sidecar; refuse (and remove) a folder that mentions a local path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    _ship_remote_code(out_dir, pipe)
    _drop_name_or_path(out_dir)
    write_atomic(out_dir / SIDECAR, json.dumps(sidecar, indent=2))
    leaks = find_local_paths(out_dir, local_roots(out_dir, *sources))
    if leaks:
        shutil.rmtree(out_dir)
        raise RuntimeError(f"export would record local paths ({'; '.join(leaks)}); nothing written")
    return out_dir


def _classes(run: dict) -> dict:
    """The sidecar's ``classes`` ({index: name}) of a class-conditional prior run; nothing for an unconditional one."""
    n = run.get("num_classes") or 0
    names = run.get("id2label") or {}
    return {"classes": {str(i): names.get(str(i), str(i)) for i in range(n)}} if n else {}


def export_gpt(prior_dir: str | Path, out_dir: str | Path, dataset: str | None = None) -> Path:
    """A ``VQGPTPipeline`` folder from a finished GPT prior run."""
    prior_dir, out_dir = Path(prior_dir), Path(out_dir)
    run, cfg, tokenizer, facts = _prior_run(prior_dir, dataset)
    if run.get("kind") != "gpt":
        raise ValueError(f"{prior_dir} is a {run.get('kind')} run, not a gpt run")
    transformer = GPT2LMHeadModel.from_pretrained(prior_dir / "transformer").eval()
    guidance = {k: run[k] for k in ("top_p", "guidance_scale", "cfg_interval", "label_dropout", "id2label") if k in run}
    pipe = VQGPTPipeline(vqvae=export_tokenizer(tokenizer), transformer=transformer, num_codes=run["num_codes"],
                         grid=run["grid"], top_k=run["top_k"], temperature=run["temperature"],
                         num_classes=run["num_classes"], **guidance)
    sampling = {"top_k": run["top_k"], "temperature": run["temperature"],
                **{k: v for k, v in guidance.items() if k not in ("label_dropout", "id2label")}}
    return _save(pipe, out_dir, {**facts, "pipeline": "VQGPTPipeline", "sampling": sampling, **_classes(run)},
                 [prior_dir, run["tokenizer"]])


def export_ldm(prior_dir: str | Path, out_dir: str | Path, dataset: str | None = None) -> Path:
    """A stock ``LDMPipeline`` folder (vqvae + unet + DDIM scheduler) from a finished LDM prior run; a
    class-conditional one is a ``ClassConditionalLDMPipeline`` (its module shipped as remote code)."""
    prior_dir, out_dir = Path(prior_dir), Path(out_dir)
    run, cfg, tokenizer, facts = _prior_run(prior_dir, dataset)
    if run.get("kind") != "ldm":
        raise ValueError(f"{prior_dir} is a {run.get('kind')} run, not an ldm run")
    tokenizer.register_to_config(scaling_factor=run["scaling_factor"], latents_mean=run.get("latents_mean"))
    parts = dict(vqvae=export_tokenizer(tokenizer), unet=UNet2DModel.from_pretrained(prior_dir / "unet"),
                 scheduler=DDIMScheduler.from_pretrained(prior_dir / "scheduler"))
    sampling = {"num_inference_steps": cfg["ldm"]["num_inference_steps"], "eta": cfg["ldm"]["eta"]}
    if run.get("num_classes"):
        pipe = ClassConditionalLDMPipeline(**parts, num_classes=run["num_classes"],
                                           guidance_scale=run.get("guidance_scale", 1.0), id2label=run.get("id2label"))
        sampling["guidance_scale"] = run.get("guidance_scale", 1.0)
    else:
        pipe = LDMPipeline(**parts)
    return _save(pipe, out_dir, {**facts, "pipeline": type(pipe).__name__, "sampling": sampling, **_classes(run)},
                 [prior_dir, run["tokenizer"]])


def export_prior(prior_dir: str | Path, out_dir: str | Path, dataset: str | None = None) -> Path:
    """The pipeline folder of a finished prior run, whichever its kind; ``dataset`` names its data (a Hub id or
    a plain name)."""
    run = Path(prior_dir) / "run.json"
    kind = json.loads(run.read_text()).get("kind") if run.exists() else None
    if kind not in EXPORTERS:
        raise ValueError(f"{prior_dir} is not a finished train-prior run")
    return EXPORTERS[kind](prior_dir, out_dir, dataset)


EXPORTERS = {"gpt": export_gpt, "ldm": export_ldm}
