"""The code cache: a frozen tokenizer encodes its training set once; both priors train on the result.

``RUN_DIR/codes/train.safetensors`` holds ``indices`` (N, h, w) or (N, L, h, w) for rvq, the quantised
``latents`` (N, D, h, w) the LDM models, and ``labels`` (N,), with the tokenizer's hash in its metadata:
a retrained or edited tokenizer no longer matches and the cache is rebuilt. Encoding also stores
``scaling_factor = 1 / std(latents)`` in the tokenizer's config (docs/methods.md, Stage-2 recipes).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from stage1_tokenizer.data import build_dataset, class_names
from stage1_tokenizer.train import load_run

logger = logging.getLogger(__name__)
CACHE_NAME = "codes/train.safetensors"
WEIGHTS = "diffusion_pytorch_model.safetensors"
DECODE_SETTINGS = ("scaling_factor", "latents_mean")  # config keys that do not change the tokens


def tokenizer_hash(tokenizer_dir: str | Path) -> str:
    """sha256 of the weights and of the config without the LDM's decode settings (``scaling_factor``, which
    encoding itself writes, and ``latents_mean``, absent from tokenizers saved before it existed)."""
    tokenizer_dir = Path(tokenizer_dir)
    h = hashlib.sha256()
    with (tokenizer_dir / WEIGHTS).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    config = json.loads((tokenizer_dir / "config.json").read_text())
    kept = {k: v for k, v in config.items() if k not in DECODE_SETTINGS and not k.startswith("_")}
    h.update(json.dumps(kept, sort_keys=True).encode())
    return h.hexdigest()


@dataclass
class CodeCache:
    indices: torch.Tensor  # long, (N, h, w) or (N, L, h, w)
    latents: torch.Tensor  # float32, (N, d, h, w): the tokens' codes in the quantizer's lookup_space
    labels: torch.Tensor  # long, (N,), -1 where the source has no labels
    num_codes: int
    scaling_factor: float
    tokenizer_hash: str
    num_images: int | None = None  # what was asked of encode_run (None: the tokenizer's own training images)
    classes: list[str] = field(default_factory=list)  # the labels' names, by index ([] when unnamed)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.classes)) if self.num_classes else {}

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if (self.labels >= 0).all() and len(self.labels) else 0


def cache_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CACHE_NAME


@torch.no_grad()
def encode_run(run_dir: str | Path, batch_size: int = 256, device: str | None = None,
               num_images: int | None = None) -> CodeCache:
    """Encode the run's training set with its frozen tokenizer (eval mode, hard tokens) and write the cache.
    ``num_images``: how many training images of its data source to encode; None: the ones the tokenizer trained on."""
    run = Path(run_dir)
    cfg, model = load_run(run)
    dataset = build_dataset(cfg.data.source, cfg.model.resolution, cfg.model.in_channels, "train",
                            cfg.data.num_images if num_images is None else num_images, cfg.data.holdout)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).set_hard_inference(True)
    indices, labels = [], []
    for x, y in tqdm(DataLoader(dataset, batch_size=batch_size), desc=f"encoding {run.name}", unit="batch"):
        indices.append(model.tokenize(x.to(device)).cpu())
        labels.append(torch.as_tensor(y))
    idx, labels = torch.cat(indices), torch.cat(labels).long()
    latents = torch.cat([model.lookup_latents(chunk.to(device)).float().cpu() for chunk in idx.split(batch_size)])
    classes = class_names(dataset)
    scaling = float(1.0 / latents.std().clamp_min(1e-8))
    digest = tokenizer_hash(run / "tokenizer")
    path = cache_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"indices": idx.to(torch.int32).contiguous(), "latents": latents.contiguous(),
               "labels": labels.contiguous()}, str(tmp),
              metadata={"tokenizer_hash": digest, "num_codes": str(model.quantize.num_codes),
                        "scaling_factor": repr(scaling), "source": cfg.data.source,
                        "num_images": "" if num_images is None else str(num_images), "classes": json.dumps(classes)})
    tmp.replace(path)
    model.register_to_config(scaling_factor=scaling)
    model.save_config(run / "tokenizer")  # the scale travels with the tokenizer (and its export)
    logger.info("cached %d code grids %s (scaling_factor %.4f) in %s", len(idx), tuple(idx.shape[1:]), scaling, path)
    return CodeCache(idx, latents, labels, model.quantize.num_codes, scaling, digest, num_images, classes)


def read_cache(path: Path) -> CodeCache:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in ("indices", "latents", "labels")}
    num_images = int(meta["num_images"]) if meta.get("num_images") else None  # "" (or absent): the tokenizer's own
    return CodeCache(tensors["indices"].long(), tensors["latents"], tensors["labels"], int(meta["num_codes"]),
                     float(meta["scaling_factor"]), meta["tokenizer_hash"], num_images,
                     json.loads(meta.get("classes") or "[]"))  # caches written before names: unnamed


def load_codes(run_dir: str | Path, batch_size: int = 256, num_images: int | None = None) -> CodeCache:
    """The run's code cache, (re)built when missing, unreadable, made by a different tokenizer or for another
    ``num_images`` (see :func:`encode_run`)."""
    run = Path(run_dir)
    path = cache_path(run)
    if path.exists():
        try:
            cache = read_cache(path)
        except Exception as e:  # a truncated or foreign file: rebuild rather than fail
            logger.warning("code cache %s is unreadable (%s); re-encoding", path, e)
        else:
            if cache.tokenizer_hash != tokenizer_hash(run / "tokenizer"):
                logger.warning("code cache %s was made by a different tokenizer; re-encoding", path)
            elif cache.num_images != num_images:
                logger.warning("code cache %s holds num_images=%s, not %s; re-encoding", path, cache.num_images,
                               num_images)
            else:
                return cache
    return encode_run(run, batch_size, num_images=num_images)
