"""Load an exported pipeline folder, sample it in batches, and score generation FID against the training set.

    vqgen sample runs/sweep/vq/pipelines/gpt --num-images 64 --output-dir samples/
    vqgen gfid runs/sweep/vq/pipelines/ldm --data mnist --num-images 1000
"""
from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from torchvision.utils import save_image
from tqdm.auto import tqdm

from eval.classifier import cached_classifier, class_consistency
from eval.fid import Features, extract_features
from eval.fid_cache import reference_features
from eval.sample_quality import BOOTSTRAP, sample_quality
from stage1_tokenizer.data import build_dataset, content_fingerprint
from stage2_prior.attention import fit_attention

from .export import SIDECAR


def load_pipeline(path: str | Path, device: str | None = None) -> tuple[DiffusionPipeline, dict]:
    """A pipeline folder written by export and its sidecar, loaded as any diffusers user loads it: the folder's
    own code (``VQGPTPipeline``, ``VQLookupTokenizer``) runs as remote code, which vqgen wrote itself."""
    path = Path(path)
    if not (path / "model_index.json").exists():
        raise ValueError(f"{path} is not a pipeline folder (no model_index.json)")
    pipe = DiffusionPipeline.from_pretrained(path, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe.to(device)
    for name in ("transformer", "unet"):  # the attention kernel for this device, as the trainers use
        if getattr(pipe, name, None) is not None:
            fit_attention(getattr(pipe, name), device)
    sidecar = json.loads((path / SIDECAR).read_text()) if (path / SIDECAR).exists() else {}
    return pipe, sidecar


def is_gpt_pipeline(pipe: DiffusionPipeline) -> bool:
    """Whether ``pipe`` is a ``VQGPTPipeline`` (vqgen's class or its copy loaded as remote code)."""
    return type(pipe).__name__ == "VQGPTPipeline"


def sample_labels(sidecar: dict, start: int, n: int) -> torch.Tensor | None:
    """Class labels of images ``start .. start + n`` of a class-conditional pipeline: the classes in turn, so any
    run of ``num_classes`` images is balanced; None for an unconditional one."""
    classes = sidecar.get("classes")
    return torch.arange(start, start + n) % len(classes) if classes else None


def sample_batches(pipe: DiffusionPipeline, sidecar: dict, num_images: int, batch_size: int = 32,
                   seed: int = 0, guidance_scale: float | None = None) -> Iterator[torch.Tensor]:
    """Batches of images (B, C, H, W) in [0, 1]; one generator seeded once, so a run is reproducible. A
    class-conditional pipeline samples the classes in turn (:func:`sample_labels`), guided by ``guidance_scale``
    (None: the pipeline's own)."""
    generator = torch.Generator().manual_seed(seed)
    gpt = is_gpt_pipeline(pipe)
    kwargs = {} if gpt else dict(sidecar.get("sampling", {}))
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    done = 0
    with tqdm(total=num_images, unit="img", desc="sampling") as bar:
        while done < num_images:
            n = min(batch_size, num_images - done)
            labels = sample_labels(sidecar, done, n)
            extra = {**kwargs, **({"class_labels": labels} if labels is not None else {})}
            if gpt:
                images = pipe(batch_size=n, generator=generator, output_type="pt", **extra).images
            else:  # stock pipelines: LDMPipeline returns numpy (B, H, W, C)
                images = torch.from_numpy(pipe(batch_size=n, generator=generator, output_type="np", **extra).images)
                images = images.permute(0, 3, 1, 2)
            done += n
            bar.update(n)
            yield images.float().cpu()


def write_samples(pipe, sidecar: dict, num_images: int, output_dir: str | Path, batch_size: int = 32,
                  seed: int = 0) -> Path:
    """PNG files 000000.png... plus grid.png (the first 64) in ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    first, i = [], 0
    for batch in sample_batches(pipe, sidecar, num_images, batch_size, seed):
        for image in batch:
            save_image(image, out / f"{i:06d}.png")
            i += 1
        first.extend(batch[: max(0, 64 - len(first))])
    save_image(torch.stack(first), out / "grid.png", nrow=8, padding=1)
    return out


def dataset_images(dataset, start: int, stop: int, batch_size: int = 64):
    """Images ``start`` to ``stop - 1`` of a tokenizer dataset as a source of [0, 1] batches for ``extract_features``."""
    def images():
        for first in range(start, stop, batch_size):
            yield torch.stack([(dataset[i][0] + 1) / 2 for i in range(first, min(first + batch_size, stop))])

    return images


def dataset_features(source: str, resolution: int, channels: int, num_images: int, cache_dir=None,
                     mode: str = "clean") -> Features:
    """Inception features of the first ``num_images`` training images as the tokenizer sees them, from this
    machine's FID cache (``cache_dir`` overrides it) when that content was seen before."""
    dataset = build_dataset(source, resolution, channels, "train", num_images)
    if len(dataset) < num_images:
        raise ValueError(f"{source} has {len(dataset)} training images, {num_images} requested")
    name = Path(source).name or "data"
    return reference_features(dataset_images(dataset, 0, num_images), name, resolution, num_images, cache_dir,
                              fingerprint=f"{content_fingerprint(dataset)}|train|{resolution}px|{channels}ch",
                              mode=mode)


CLASSIFIED_SOURCES = ("mnist",)  # data whose classifier vqgen trains for class consistency


def _as_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of every example of ``dataset``, each read once."""
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels)


@functools.lru_cache(maxsize=None)  # a guidance curve scores one pipeline at several scales: one judge per process
def data_classifier(source: str, resolution: int, channels: int):
    """(classifier, test accuracy) of ``source`` at the pipeline's image format, trained once per machine on its
    whole training split and tested on its test split; None for data without one."""
    if source not in CLASSIFIED_SOURCES:
        return None
    train = build_dataset(source, resolution, channels, "train")
    return cached_classifier(f"{source}-{resolution}px-{channels}ch", content_fingerprint(train),
                             lambda: (_as_tensors(train), _as_tensors(build_dataset(source, resolution, channels, "test"))))


def gfid(pipeline_dir: str | Path, data: str | None = None, num_images: int = 1000, batch_size: int = 32,
         seed: int = 0, ref_images: int | None = None, cache_dir: str | Path | None = None,
         save_grid: str | Path | None = None, num_boot: int = BOOTSTRAP, fid_mode: str = "clean",
         guidance_scale: float | None = None) -> dict:
    """Generation FID of a pipeline against its training set's cached features, with its bootstrap 95% interval
    (``num_boot`` resamples), KID and its std over subsets, and precision / recall / density / coverage; no images
    are written except a grid of the first 64 at ``save_grid`` when given. ``fid_mode``: the FID protocol
    (``eval.fid_modes``), named in the result. A class-conditional pipeline samples the classes in turn at
    ``guidance_scale`` (None: its own) and, where the data has a classifier, is scored for class consistency."""
    pipe, sidecar = load_pipeline(pipeline_dir)
    source = data or sidecar.get("data_source")
    if source is None:
        raise ValueError(f"pass --data: the pipeline folder names its dataset ({sidecar.get('dataset', 'unknown')!r}) "
                         "but exports never record a local path")
    vqvae = pipe.vqvae.config
    channels = vqvae.in_channels
    resolution = sidecar.get("resolution") or getattr(vqvae, "sample_size", None) or vqvae.resolution
    ref = dataset_features(source, resolution, channels, ref_images or num_images, cache_dir, fid_mode)
    kept, hits = [], []
    classes = len(sidecar.get("classes") or {})
    judge = data_classifier(source, resolution, channels) if classes else None
    shown = 8 * classes or 64  # the grid: 8 per class (a row each), or the first 64

    def generated():
        done = 0
        for batch in sample_batches(pipe, sidecar, num_images, batch_size, seed, guidance_scale):
            if save_grid is not None and sum(len(k) for k in kept) < shown:
                kept.append(batch)
            if judge is not None:
                hits.append(class_consistency(judge[0], batch, sample_labels(sidecar, done, len(batch))) * len(batch))
            done += len(batch)
            yield batch

    quality = sample_quality(extract_features(generated, num_images=num_images, mode=fid_mode), ref, num_boot, seed)
    if save_grid is not None:
        Path(save_grid).parent.mkdir(parents=True, exist_ok=True)
        grid = torch.cat(kept)[:shown]
        if classes:  # image j has class j mod n: row c holds class c's images
            grid = torch.cat([grid[c::classes][:8] for c in range(classes)])
        save_image(grid, save_grid, nrow=8, padding=1)
    quality["gfid"], quality["gfid_ci"] = quality.pop("fid"), quality.pop("fid_ci")
    if classes:  # both conditional pipelines hold their default scale in their config
        quality["guidance_scale"] = pipe.config.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
    if judge is not None:
        quality["class_consistency"], quality["classifier_accuracy"] = sum(hits) / num_images, judge[1]
    return {**quality, "num_images": num_images, "ref_images": ref_images or num_images, "data": source,
            "seed": seed, "pipeline": sidecar.get("pipeline"), "fid_mode": fid_mode}
