"""Publish an exported pipeline folder to the Hugging Face Hub with a model card carrying its measured numbers.

    vqgen publish runs/sweep/vq/pipelines/gpt --repo-id me/vqgen-vq-gpt --dry-run

The token comes from huggingface_hub's usual sources (``HF_TOKEN``, the login cache) and is handed to
``HfApi`` only: it is never printed, logged or written.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from torchvision.utils import save_image

from .export import SIDECAR

TASK = "unconditional-image-generation"
METRICS = {"gfid": "gFID", "rfid": "rFID", "usage": "codebook usage", "perplexity": "codebook perplexity"}


def card_data(sidecar: dict, repo_id: str) -> ModelCardData:
    """Metadata with ``model-index`` results for every measured metric, plus the quantizer and its config."""
    metrics = sidecar.get("metrics", {})
    dataset = str(sidecar.get("dataset", "unknown"))
    results = [EvalResult(task_type=TASK, dataset_type=dataset, dataset_name=dataset, dataset_split=split,
                          metric_type=key, metric_name=METRICS[key], metric_value=round(float(metrics[key]), 4))
               for key, split in (("gfid", "train"), ("rfid", "test"), ("usage", "test"), ("perplexity", "test"))
               if metrics.get(key) is not None]
    quantizer = sidecar.get("quantizer", "unknown")
    return ModelCardData(model_name=repo_id.split("/")[-1], library_name="diffusers", pipeline_tag=TASK,
                         tags=[t for t in ("vqgen", "vector-quantization", f"quantizer-{quantizer}",
                                           sidecar.get("pipeline")) if t],
                         datasets=[dataset], eval_results=results or None, license="mit",
                         vqgen={"quantizer": quantizer, "num_codes": sidecar.get("num_codes"),
                                "quantizer_options": sidecar.get("quantizer_options", {}),
                                "pipeline": sidecar.get("pipeline"), "sampling": sidecar.get("sampling", {}),
                                "num_fid_images": metrics.get("num_images"), "config": sidecar.get("config", {})})


def _usage(sidecar: dict, repo_id: str) -> str:
    steps = sidecar.get("sampling", {}).get("num_inference_steps", 50)
    if sidecar.get("pipeline") == "VQGPTPipeline":
        return ("```python\n# VQGPTPipeline is defined by vqgen (pip install the vqgen project)\nimport torch\n"
                "from pipelines.vqgpt_pipeline import VQGPTPipeline\n\n"
                f'pipe = VQGPTPipeline.from_pretrained("{repo_id}")\n'
                "images = pipe(batch_size=16, generator=torch.Generator().manual_seed(0)).images\n```\n")
    loader = "LDMPipeline" if sidecar.get("stock_vqmodel", True) else "DiffusionPipeline  # vqvae needs vqgen installed"
    return (f"```python\nfrom diffusers import {loader.split()[0]}\n\n"
            f'pipe = {loader.split()[0]}.from_pretrained("{repo_id}")\n'
            f"images = pipe(batch_size=16, num_inference_steps={steps}).images\n```\n")


def model_card(sidecar: dict, repo_id: str) -> ModelCard:
    data = card_data(sidecar, repo_id)
    metrics = sidecar.get("metrics", {})
    rows = "\n".join(f"| {name} | {metrics[key]:.4g} |" for key, name in METRICS.items() if metrics.get(key) is not None)
    stock = sidecar.get("stock_vqmodel", True)
    tokenizer_note = ("The tokenizer (`vqvae`) is a stock `diffusers.VQModel`: "
                      f'`VQModel.from_pretrained("{repo_id}", subfolder="vqvae")`.' if stock else
                      f"The tokenizer is vqgen's `VQTokenizer` ({sidecar.get('not_stock_because')}).")
    body = f"""---
{data.to_yaml()}
---

# {repo_id.split("/")[-1]}

`{sidecar.get("pipeline")}` trained by vqgen on `{sidecar.get("dataset")}`: a VQ tokenizer with the
**{sidecar.get("quantizer")}** quantizer (K = {sidecar.get("num_codes")}) and a generative prior on its frozen codes.
The full tokenizer and prior configs are in the card's `vqgen.config` metadata and in `vqgen.json`.

![samples](samples.png)

## Measured

| metric | value |
|---|---:|
{rows or "| (none measured) | |"}

gFID: {metrics.get("num_images", "?")} samples against the training set's statistics (clean-fid "clean" mode,
Inception-v3 FID weights); rFID, usage and perplexity on the held-out split.

## Use

{_usage(sidecar, repo_id)}
{tokenizer_note}
"""
    return ModelCard(body)


def stage(pipeline_dir: str | Path, repo_id: str, out_dir: str | Path) -> Path:
    """Write exactly the folder that would be uploaded: the pipeline, README.md (the card) and samples.png."""
    from .sample import load_pipeline, sample_batches

    src, out = Path(pipeline_dir), Path(out_dir)
    if not (src / "model_index.json").exists():
        raise ValueError(f"{src} is not a pipeline folder (no model_index.json)")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    shutil.copytree(src, out, dirs_exist_ok=True)
    sidecar = json.loads((src / SIDECAR).read_text()) if (src / SIDECAR).exists() else {}
    if not (out / "samples.png").exists():
        pipe, _ = load_pipeline(src)
        images = torch.cat(list(sample_batches(pipe, sidecar, 16, 16, seed=0)))
        save_image(images, out / "samples.png", nrow=4, padding=1)
    model_card(sidecar, repo_id).save(out / "README.md")
    return out


def publish(pipeline_dir: str | Path, repo_id: str, private: bool = False, dry_run: bool = False,
            output_dir: str | Path | None = None, api: HfApi | None = None) -> Path:
    """Stage the folder; unless ``dry_run``, create the repo and upload it. Returns the staged folder."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--repo-id must look like OWNER/NAME, got {repo_id!r}")
    out = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="vqgen-publish-"))
    staged = stage(pipeline_dir, repo_id, out)
    if dry_run:
        return staged
    token = get_token()
    if not token:
        raise ValueError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (or use --dry-run)")
    api = api or HfApi()
    api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_id, folder_path=str(staged), token=token, repo_type="model",
                      commit_message="Upload vqgen pipeline")
    return staged
