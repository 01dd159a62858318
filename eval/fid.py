"""FID under clean-fid's protocols, offline: a resize to 299 (``clean`` by default: PIL bicubic on floats; the
legacy TensorFlow and PyTorch ones in ``fid_modes``), then the TF Inception pool3.

An image source is a folder (the files clean-fid would read, recursively, sorted), an in-memory batch
(N, 3|1, H, W) uint8 or float in [0, 1], or a generator function yielding such batches, so a pipeline can be
scored without writing images. In-memory floats are resized unquantised, as clean-fid does for generators.
"""
from __future__ import annotations

import glob
import itertools
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from cleanfid.utils import EXTENSIONS
from PIL import Image
from tqdm.auto import tqdm

from .fid_modes import resizer
from .images import check_images, to_rgb
from .inception import load_inception

# Batch sizes (benchmarks/bench_fid.py): on a CPU, small batches keep Inception's activations in cache; GPUs want
# large ones. Decoding and resizing are a small part of an image's cost, so they stay in the main thread.
CPU_BATCH_SIZE = 8
GPU_BATCH_SIZE = 64
NUM_WORKERS = 0
NUM_THREADS = None  # torch intra-op threads while extracting; None keeps torch's setting
IMAGE_EXTENSIONS = sorted(EXTENSIONS - {"npy"})

Source = str | os.PathLike | torch.Tensor | Callable[[], Iterable[torch.Tensor]]


@dataclass
class Features:
    """Inception features (N, 2048) of an image source, and the files skipped as unreadable."""
    array: np.ndarray
    skipped: list[str] = field(default_factory=list)


@dataclass
class Stats:
    """Mean and covariance of Inception features: all FID needs of an image set."""
    mu: np.ndarray
    sigma: np.ndarray
    num_images: int

    @classmethod
    def of(cls, feats: Features) -> Stats:
        f = feats.array.astype(np.float64)
        return cls(f.mean(0), np.cov(f, rowvar=False), len(f))


def default_batch_size(device: str | torch.device) -> int:
    """Images per Inception forward pass on ``device`` (8 on a CPU, 64 on an accelerator)."""
    return CPU_BATCH_SIZE if torch.device(device).type == "cpu" else GPU_BATCH_SIZE


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def image_files(folder) -> list[str]:
    """The image files of ``folder`` and its subfolders, sorted; a clear error if there are none."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"not a directory: {folder}")
    patterns = [os.path.join(glob.escape(folder), f"**/*.{ext}") for ext in IMAGE_EXTENSIONS]
    files = sorted({f for p in patterns for f in glob.glob(p, recursive=True)})
    if not files:
        raise ValueError(f"no images in {folder} (looked for {', '.join('*.' + e for e in IMAGE_EXTENSIONS)})")
    return files


def read_resized(path: str, resize):
    """(image file decoded to RGB and ``resize``d, None), or (None, reason) for a file PIL cannot decode."""
    try:
        with Image.open(path) as im:
            x = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return None, f"{path} ({e})"
    return resize(x), None


def _resize(x: np.ndarray, resize):
    return resize(x), None


def _as_hwc255(batch, name: str) -> list[np.ndarray]:
    """A checked batch as a list of (H, W, 3) float32 arrays in [0, 255]."""
    x = to_rgb(check_images(batch, name)).cpu()
    x = x.float() if x.dtype == torch.uint8 else x.float() * 255
    return list(x.permute(0, 2, 3, 1).numpy())


def _chunked(items: Iterator, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _plan(source: Source, num_images: int | None, batch_size: int, mode: str = "clean"):
    """(chunks of batch_size items, function loading one item, number of items or None, label) for a source,
    resized by the FID ``mode``'s protocol.

    A generator's batches are re-cut to ``batch_size``, so small batches still make full forward passes.
    """
    resize = resizer(mode)
    load = partial(_resize, resize=resize)
    if isinstance(source, (str, os.PathLike)):
        files = image_files(source)
        if num_images is not None and len(files) < num_images:
            raise ValueError(f"{source} has {len(files)} images, {num_images} requested")
        files = files[:num_images]
        label = os.path.basename(os.path.normpath(source))
        return _chunked(iter(files), batch_size), partial(read_resized, resize=resize), len(files), label
    if isinstance(source, (torch.Tensor, np.ndarray)):
        x = check_images(source)
        if num_images is not None and len(x) < num_images:
            raise ValueError(f"batch has {len(x)} images, {num_images} requested")
        x = x[:num_images]
        items = (im for i in range(0, len(x), batch_size) for im in _as_hwc255(x[i:i + batch_size], "images"))
        return _chunked(items, batch_size), load, len(x), "tensor"
    if callable(source):
        items = (im for k, b in enumerate(source()) for im in _as_hwc255(b, f"batch {k}"))
        label = getattr(source, "__name__", "generator")
        return _chunked(itertools.islice(items, num_images), batch_size), load, num_images, label
    raise TypeError(f"an image source is a folder, an (N, C, H, W) batch or a generator function, got {type(source)}")


def _loaded(chunks: Iterator[list], load, num_workers: int) -> Iterator[list]:
    """``load`` applied to every item, chunk by chunk; with workers, chunk k+1 loads in threads while chunk k is used.

    Threads, not processes: PIL releases the GIL while it decodes and resamples, and nothing needs pickling.
    """
    if num_workers == 0:
        yield from ([load(item) for item in chunk] for chunk in chunks)
        return
    with ThreadPoolExecutor(num_workers) as pool:
        pending = None
        for chunk in chunks:
            submitted = [pool.submit(load, item) for item in chunk]
            if pending is not None:
                yield [f.result() for f in pending]
            pending = submitted
        if pending is not None:
            yield [f.result() for f in pending]


def extract_features(source: Source, num_images: int | None = None, batch_size: int | None = None,
                     num_workers: int = NUM_WORKERS, num_threads: int | None = NUM_THREADS, device: str | None = None,
                     progress: bool = True, mode: str = "clean") -> Features:
    """Inception features of the first ``num_images`` images of ``source`` (all if None), under the FID
    protocol ``mode`` (``eval.fid_modes``: clean, legacy_tensorflow, legacy_pytorch).

    ``batch_size`` None takes :func:`default_batch_size` of the device; ``num_workers`` threads decode and resize
    (0: the main thread does); ``num_threads`` sets torch's intra-op
    threads for the duration. Unreadable files are skipped with a warning naming each, and listed in
    ``Features.skipped``.
    """
    device = device or default_device()
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    if batch_size < 1 or num_workers < 0 or (num_threads is not None and num_threads < 1):
        raise ValueError(f"need batch_size >= 1, num_workers >= 0, num_threads >= 1 or None; "
                         f"got {batch_size}, {num_workers}, {num_threads}")
    chunks, load, total, label = _plan(source, num_images, batch_size, mode)  # an unknown mode fails here
    model = load_inception(str(device))
    feats, skipped = [], []
    threads_before = torch.get_num_threads()
    torch.set_num_threads(num_threads or threads_before)
    try:
        with torch.inference_mode(), tqdm(total=total, unit="img", desc=f"FID features {label}",
                                          disable=not progress) as bar:
            for loaded in _loaded(chunks, load, num_workers):
                for _, reason in loaded:
                    if reason:
                        warnings.warn(f"skipping unreadable image {reason}", stacklevel=2)
                        skipped.append(reason)
                images = [x for x, _ in loaded if x is not None]
                if images:  # (B, H, W, 3) viewed as NCHW is channels-last: faster convolutions on a CPU
                    batch = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2)
                    feats.append(model(batch).cpu().numpy())
                bar.update(len(loaded))
    finally:
        torch.set_num_threads(threads_before)
    n = sum(len(f) for f in feats)
    if skipped:
        warnings.warn(f"{label}: skipped {len(skipped)} unreadable of {n + len(skipped)} images", stacklevel=2)
    if n == 0:
        raise ValueError(f"{label}: no readable images")
    if num_images is not None and n + len(skipped) < num_images:
        raise ValueError(f"{label} yielded {n + len(skipped)} images, {num_images} requested")
    return Features(np.concatenate(feats), skipped)


def images_per_second(device: str | None = None, batch_size: int | None = None, batches: int = 2) -> float:
    """Inception's throughput on this machine now: one warm-up batch, then ``batches`` timed batches of random
    299-px images (the network alone, no decoding or resizing)."""
    device = device or default_device()
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    model = load_inception(str(device))
    x = torch.rand(batch_size, 3, 299, 299, device=device).mul_(255).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        for _ in range(batches):
            model(x).cpu()
        return batches * batch_size / (time.perf_counter() - start)


def frechet_distance(s1: Stats, s2: Stats) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), with tr (S1 S2)^1/2 from the eigenvalues of S1^1/2 S2 S1^1/2.

    That matrix is symmetric PSD with the eigenvalues of S1 S2, so two eigh calls replace scipy's sqrtm (which
    clean-fid uses): same value, no complex round-off, several times faster at d = 2048.
    """
    if s1.mu.shape != s2.mu.shape:
        raise ValueError(f"feature dimensions differ: {s1.mu.shape} vs {s2.mu.shape}")
    w, v = np.linalg.eigh(s1.sigma)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    tr_cross = np.sqrt(np.linalg.eigvalsh(root1 @ s2.sigma @ root1).clip(min=0)).sum()
    diff = s1.mu - s2.mu
    return float(diff @ diff + np.trace(s1.sigma) + np.trace(s2.sigma) - 2 * tr_cross)


def fid_from_features(f1: Features, f2: Features) -> float:
    """FID of two feature sets; exact shortcut when they are small.

    With centred features A1 (n1, d), A2 (n2, d): S1 S2 = A1'A1 A2'A2 / c shares its non-zero eigenvalues with
    M M' for M = A1 A2' (n1, n2), so tr (S1 S2)^1/2 = nuclear norm of M / sqrt(c), c = (n1 - 1)(n2 - 1).
    """
    a1, a2 = f1.array.astype(np.float64), f2.array.astype(np.float64)
    n1, n2, d = len(a1), len(a2), a1.shape[1]
    if min(n1, n2) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {n1} and {n2}")
    if n1 * n2 > d * d:
        return frechet_distance(Stats.of(f1), Stats.of(f2))
    mu1, mu2 = a1.mean(0), a2.mean(0)
    a1, a2 = a1 - mu1, a2 - mu2
    tr_cross = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return float(diff @ diff + (a1 * a1).sum() / (n1 - 1) + (a2 * a2).sum() / (n2 - 1) - 2 * tr_cross)


def fid(a: Source | Features | Stats, b: Source | Features | Stats, **kwargs) -> float:
    """FID between two image sources, feature sets or statistics; ``kwargs`` go to ``extract_features``."""
    a, b = (x if isinstance(x, (Features, Stats)) else extract_features(x, **kwargs) for x in (a, b))
    if isinstance(a, Features) and isinstance(b, Features):
        return fid_from_features(a, b)
    return frechet_distance(*(x if isinstance(x, Stats) else Stats.of(x) for x in (a, b)))
