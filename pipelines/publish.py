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
from huggingface_hub.repocard_data import model_index_to_eval_results
from huggingface_hub.utils import validate_repo_id
from torchvision.utils import save_image

from .export import SIDECAR
from .redact import find_local_paths, is_hub_id, local_roots, redact

TASK = "unconditional-image-generation"
METRICS = {"gfid": "gFID", "kid": "KID", "precision": "precision", "recall": "recall", "rfid": "rFID",
           "usage": "codebook usage", "perplexity": "codebook perplexity"}
SPLITS = {"gfid": "train", "kid": "train", "precision": "train", "recall": "train"}  # the rest: held-out


def _interval(metrics: dict, key: str) -> str:
    """`` [lo, hi]`` (95% interval) and/or `` ± std`` where the run measured them."""
    text = ""
    if metrics.get(f"{key}_ci"):
        lo, hi = metrics[f"{key}_ci"]
        text += f" [{lo:.4g}, {hi:.4g}]"
    if metrics.get(f"{key}_std") is not None:
        text += f" ± {metrics[f'{key}_std']:.2g}"
    return text


def card_data(sidecar: dict, repo_id: str) -> ModelCardData:
    """Metadata with ``model-index`` results for every measured metric, plus the quantizer and its config.

    ``datasets`` (which the Hub shows as links) is written only when the dataset is named by a Hub id."""
    metrics = sidecar.get("metrics", {})
    dataset = str(sidecar.get("dataset") or "unknown")
    results = [EvalResult(task_type=TASK, dataset_type=dataset, dataset_name=dataset,
                          dataset_split=SPLITS.get(key, "test"), metric_type=key, metric_name=METRICS[key],
                          metric_value=round(float(metrics[key]), 6)) for key in METRICS if metrics.get(key) is not None]
    quantizer = sidecar.get("quantizer", "unknown")
    return ModelCardData(model_name=repo_id.split("/")[-1], library_name="diffusers", pipeline_tag=TASK,
                         tags=[t for t in ("vqgen", "vector-quantization", f"quantizer-{quantizer}",
                                           sidecar.get("pipeline")) if t],
                         datasets=[dataset] if is_hub_id(dataset) else None, eval_results=results or None,
                         license="mit",
                         vqgen={"quantizer": quantizer, "num_codes": sidecar.get("num_codes"), "dataset": dataset,
                                "quantizer_options": sidecar.get("quantizer_options", {}),
                                "pipeline": sidecar.get("pipeline"), "sampling": sidecar.get("sampling", {}),
                                "num_fid_images": metrics.get("num_images"), "fid_mode": metrics.get("fid_mode", "clean"),
                                "intervals": {k: v for k, v in metrics.items() if k.endswith(("_ci", "_std"))},
                                "config": sidecar.get("config", {})})


def remote_code_files(pipeline_dir: str | Path) -> list[str]:
    """The code files the folder's ``model_index.json`` points at (``[module, class]`` entries with a ``module.py``
    beside them), which diffusers runs only with ``trust_remote_code=True``."""
    index = json.loads((Path(pipeline_dir) / "model_index.json").read_text())
    files = []
    for name, entry in sorted(index.items()):
        if isinstance(entry, list) and entry and isinstance(entry[0], str):
            relative = f"{entry[0]}.py" if name == "_class_name" else f"{name}/{entry[0]}.py"
            if (Path(pipeline_dir) / relative).exists():
                files.append(relative)
    return files


def needs_remote_code(pipeline_dir: str | Path) -> bool:
    return bool(remote_code_files(pipeline_dir))


def usage_code(sidecar: dict, source: str, remote_code: bool, batch_size: int = 16) -> str:
    """The card's "Use" snippet: load ``source`` (a repo id or folder) with stock diffusers and sample, seeded.

    The tests run exactly this code in a Python without vqgen."""
    trust = ", trust_remote_code=True" if remote_code else ""
    kwargs = f"batch_size={batch_size}, generator=torch.Generator().manual_seed(0)"
    if sidecar.get("pipeline") != "VQGPTPipeline":
        kwargs += "".join(f", {k}={v!r}" for k, v in sidecar.get("sampling", {}).items())
    if classes := sidecar.get("classes"):  # one image per class in turn
        kwargs += f", class_labels={[i % len(classes) for i in range(batch_size)]}"
    return ("import torch\nfrom diffusers import DiffusionPipeline\n\n"
            f"pipe = DiffusionPipeline.from_pretrained({json.dumps(source)}{trust})\n"
            f"images = pipe({kwargs}).images  # PIL images\n")


def model_card(sidecar: dict, repo_id: str, remote_files: list[str]) -> ModelCard:
    data = card_data(sidecar, repo_id)
    metrics = sidecar.get("metrics", {})
    rows = "\n".join(f"| {name} | {metrics[key]:.4g}{_interval(metrics, key)} |" for key, name in METRICS.items()
                     if metrics.get(key) is not None)
    stock = sidecar.get("stock_vqmodel", True)
    tokenizer_note = ("The tokenizer (`vqvae`) is a stock `diffusers.VQModel`: "
                      f'`VQModel.from_pretrained("{repo_id}", subfolder="vqvae")`.' if stock else
                      f"The tokenizer (`vqvae`) is vqgen's `VQLookupTokenizer` ({sidecar.get('not_stock_because')}); "
                      "its code ships in `vqvae/lookup_tokenizer.py` and loads with `trust_remote_code=True`.")
    remote_note = (f"`trust_remote_code=True` runs the code in this repository ({', '.join(f'`{f}`' for f in remote_files)}; "
                   "it imports only torch, diffusers and transformers): read it first.\n\n" if remote_files else "")
    dataset = sidecar.get("dataset") or "unknown"
    shown = f"[`{dataset}`](https://huggingface.co/datasets/{dataset})" if is_hub_id(dataset) else f"`{dataset}`"
    body = f"""---
{data.to_yaml()}
---

# {repo_id.split("/")[-1]}

`{sidecar.get("pipeline")}` trained by vqgen on {shown}{_image_format(sidecar)}: a VQ tokenizer with the
**{sidecar.get("quantizer")}** quantizer (K = {sidecar.get("num_codes")}) and a generative prior on its frozen codes.
The full tokenizer and prior configs are in the card's `vqgen.config` metadata and in `vqgen.json`.

![samples](samples.png)

## Measured

| metric | value |
|---|---:|
{rows or "| (none measured) | |"}

gFID, KID, precision and recall: {metrics.get("num_images", "?")} samples against the training set's statistics
(clean-fid "{metrics.get("fid_mode", "clean")}" mode, Inception-v3 FID weights; [lo, hi] a 95% interval, ± a std where measured); rFID, usage
and perplexity on the held-out split.

## Use

```python
{usage_code(sidecar, repo_id, bool(remote_files))}```

{_classes_note(sidecar)}{remote_note}{tokenizer_note}
"""
    return ModelCard(body)


def _classes_note(sidecar: dict) -> str:
    """The card's paragraph on a class-conditional pipeline: what ``class_labels`` index and the guidance scale."""
    classes = sidecar.get("classes")
    if not classes:
        return ""
    names = ", ".join(f"{i} `{name}`" for i, name in classes.items())
    scale = sidecar.get("sampling", {}).get("guidance_scale", 1.0)
    return (f"Class-conditional: `class_labels` (one per image) index {names}; classifier-free guidance scale "
            f"{scale:g} by default (`guidance_scale=`; 1: none, 0: the unconditional model).\n\n")


def validate_card(card: ModelCard) -> None:
    """Parse the card back with huggingface_hub's own classes: metadata, ``model-index`` and dataset ids."""
    parsed = ModelCard(str(card))
    meta = parsed.data.to_dict()
    if "model-index" in meta:
        _, results = model_index_to_eval_results(meta["model-index"])
        if len(results) != len(card.data.eval_results or []):
            raise ValueError("model card: model-index does not round-trip")
    for dataset in meta.get("datasets") or []:
        validate_repo_id(dataset)


def _image_format(sidecar: dict) -> str:
    """`` (64x64 colour images)``: what the pipeline generates, from its sidecar; empty where not recorded."""
    if not sidecar.get("resolution"):
        return ""
    kind = {3: "colour", 1: "grey"}.get(sidecar.get("channels"), "")
    return f" ({sidecar['resolution']}x{sidecar['resolution']}{' ' + kind if kind else ''} images)"


def stage(pipeline_dir: str | Path, repo_id: str, out_dir: str | Path, dataset: str | None = None) -> Path:
    """Write exactly the folder that would be uploaded: the pipeline, README.md (the card) and samples.png; its
    sidecar is stripped of local paths and the whole folder is checked for any."""
    from .sample import load_pipeline, sample_batches

    src, out = Path(pipeline_dir), Path(out_dir)
    if not (src / "model_index.json").exists():
        raise ValueError(f"{src} is not a pipeline folder (no model_index.json)")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    shutil.copytree(src, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    sidecar = json.loads((src / SIDECAR).read_text()) if (src / SIDECAR).exists() else {}
    sidecar = redact({**sidecar, "dataset": dataset or sidecar.get("dataset")})
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=2))
    if not (out / "samples.png").exists():
        pipe, _ = load_pipeline(src)
        images = torch.cat(list(sample_batches(pipe, sidecar, 16, 16, seed=0)))
        save_image(images, out / "samples.png", nrow=4, padding=1)
    card = model_card(sidecar, repo_id, remote_code_files(src))
    validate_card(card)
    card.save(out / "README.md")
    leaks = find_local_paths(out, local_roots(src, out))
    if leaks:
        raise ValueError(f"refusing to stage {src}: local paths in {'; '.join(leaks)}")
    return out


def publish(pipeline_dir: str | Path, repo_id: str, private: bool = False, dry_run: bool = False,
            output_dir: str | Path | None = None, api: HfApi | None = None, dataset: str | None = None) -> Path:
    """Stage the folder; unless ``dry_run``, create the repo and upload it. Returns the staged folder."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--repo-id must look like OWNER/NAME, got {repo_id!r}")
    out = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="vqgen-publish-"))
    staged = stage(pipeline_dir, repo_id, out, dataset)
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
