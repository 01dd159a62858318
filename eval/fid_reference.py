"""Reference FID statistics of a dataset, cached in a directory the caller owns (e.g. the run directory).

A cache file is keyed by dataset name, resolution and number of images, and stores a fingerprint of the images
(folder: file names, sizes, mtimes; tensor: its bytes; generator: a string the caller gives) together with
the protocol and network; a file whose fingerprint differs is stale and is recomputed. Processes sharing a cache
(sweep shards) compute each file once: the others wait on its lock, then read it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import warnings
import zipfile

import numpy as np
import torch

from .fid import Features, Source, Stats, extract_features, image_files
from .images import check_images
from .inception import WEIGHTS_SHA1


def source_fingerprint(source: Source, num_images: int, given: str | None = None) -> str:
    """SHA-256 of what the statistics depend on: protocol, network, and the first ``num_images`` images."""
    h = hashlib.sha256(f"clean-fid clean|inception sha1 {WEIGHTS_SHA1}|{num_images} images|".encode())
    if given is not None:
        h.update(given.encode())
    elif isinstance(source, (str, os.PathLike)):
        for path in image_files(source)[:num_images]:
            st = os.stat(path)
            h.update(f"{os.path.relpath(path, source)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    elif isinstance(source, (torch.Tensor, np.ndarray)):
        x = check_images(source)[:num_images].cpu()
        x = x.float() if x.is_floating_point() else x
        h.update(f"{tuple(x.shape)} {x.dtype}|".encode() + x.contiguous().numpy().tobytes())
    else:
        raise ValueError("a generator source needs fingerprint=<string that changes with the data, "
                         "e.g. dataset version, split, preprocessing> so that a stale cache can be detected")
    return h.hexdigest()


def cache_path(cache_dir, name: str, resolution: int, num_images: int) -> str:
    """``cache_dir/fid_stats_<name>_<resolution>px_<num_images>.npz``; the name may not leave the directory."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ValueError(f"dataset name {name!r} may only use letters, digits, '.', '_' and '-'")
    return os.path.join(os.fspath(cache_dir), f"fid_stats_{name}_{resolution}px_{num_images}.npz")


def _read(path: str, expected: str, with_features: bool) -> tuple[Stats, Features | None] | None:
    """The cached statistics (and features), or None (with a warning) when the file is unreadable or stale."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) == expected:
                stats = Stats(z["mu"], z["sigma"], int(z["num_images"]))
                return stats, (Features(z["features"]) if with_features else None)
        reason = "its fingerprint differs (images, protocol or network changed)"
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        reason = f"it is unreadable or holds no features ({e})"
    warnings.warn(f"recomputing FID reference statistics {path}: {reason}", stacklevel=4)
    return None


@contextlib.contextmanager
def _exclusive(path: str):
    """Hold an exclusive lock on ``path.lock`` (released when the holder exits or dies)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached(source: Source, name: str, resolution: int, num_images: int, cache_dir, fingerprint: str | None,
            with_features: bool, **kwargs) -> tuple[Stats, Features | None]:
    path = cache_path(cache_dir, name, resolution, num_images)
    expected = source_fingerprint(source, num_images, fingerprint)
    with _exclusive(path):  # a second process waits here for the first's file instead of computing it again
        if os.path.exists(path) and (cached := _read(path, expected, with_features)) is not None:
            return cached
        features = extract_features(source, num_images=num_images, **kwargs)
        stats = Stats.of(features)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, mu=stats.mu, sigma=stats.sigma, num_images=stats.num_images, fingerprint=expected,
                     features=features.array)
        os.replace(tmp, path)
    return stats, features


def reference_stats(source: Source, name: str, resolution: int, num_images: int, cache_dir,
                    fingerprint: str | None = None, **kwargs) -> Stats:
    """Statistics of the first ``num_images`` images of ``source``, from ``cache_dir`` when fresh, else computed
    (``kwargs`` go to ``extract_features``) and written there. A generator source needs ``fingerprint``."""
    return _cached(source, name, resolution, num_images, cache_dir, fingerprint, False, **kwargs)[0]


def reference_features(source: Source, name: str, resolution: int, num_images: int, cache_dir,
                       fingerprint: str | None = None, **kwargs) -> Features:
    """The features themselves (for KID and precision/recall), cached in the same file as the statistics."""
    return _cached(source, name, resolution, num_images, cache_dir, fingerprint, True, **kwargs)[1]
