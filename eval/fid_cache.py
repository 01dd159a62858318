"""FID reference features computed once per machine: a cache keyed by everything that determines them.

An entry's key is the SHA-256 of the FID protocol (``clean`` or a legacy mode), the Inception weights' SHA-1, the
number of images, the resolution and the content of exactly those images (tensor bytes, file bytes, or a
fingerprint the caller derives from them, naming its preprocessing). Two output folders, or two copies of the
same images, share an entry; a changed image gives another key and so another entry. Entries live in
``user_cache_dir("fid")`` (``$VQGEN_CACHE``, ``$XDG_CACHE_HOME/vqgen`` or ``~/.cache/vqgen``). Processes sharing
the cache compute each entry once (the others wait on its lock, then read it); files are written under a
temporary name and renamed, so a kill never leaves one that looks complete. ``vqgen cache`` lists and clears it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from common.cache_dir import user_cache_dir

from .fid import Features, Source, Stats, extract_features, image_files
from .images import check_images
from .inception import WEIGHTS_SHA1

SUFFIX = ".npz"


def default_cache_dir() -> Path:
    """This machine's FID cache (resolved at call time)."""
    return user_cache_dir("fid")


def source_fingerprint(source: Source, num_images: int, given: str | None = None) -> str:
    """SHA-256 of the content of the first ``num_images`` images: tensor bytes, file bytes (with their paths
    relative to the folder), or ``given`` for a generator, whose caller knows what it yields."""
    h = hashlib.sha256()
    if given is not None:
        h.update(given.encode())
    elif isinstance(source, (str, os.PathLike)):
        for path in image_files(source)[:num_images]:
            h.update(f"{os.path.relpath(path, source)}\n".encode())
            h.update(hashlib.sha256(Path(path).read_bytes()).digest())
    elif isinstance(source, (torch.Tensor, np.ndarray)):
        x = check_images(source)[:num_images].cpu()
        x = x.float() if x.is_floating_point() else x
        h.update(f"{tuple(x.shape)} {x.dtype}|".encode() + x.contiguous().numpy().tobytes())
    else:
        raise ValueError("a generator source needs fingerprint=<string that changes with the data, "
                         "e.g. a hash of its images and preprocessing> so that a changed data set gets new features")
    return h.hexdigest()


def cache_key(content: str, resolution: int, num_images: int, mode: str = "clean") -> str:
    """The entry's key: FID protocol, network, image count, resolution and content (modes never share one)."""
    text = f"clean-fid {mode}|inception sha1 {WEIGHTS_SHA1}|{num_images} images|{resolution}px|{content}"
    return hashlib.sha256(text.encode()).hexdigest()


def cache_path(cache_dir, resolution: int, num_images: int, key: str) -> Path:
    """``cache_dir/<resolution>px-<num_images>-<key[:24]>.npz``: named by content, not by the data's name, so a
    copy of the same images under another name finds the entry."""
    return Path(cache_dir) / f"{resolution}px-{num_images}-{key[:24]}{SUFFIX}"


def _read(path: Path, key: str) -> tuple[Stats, Features] | None:
    """The cached statistics and features, or None (with a warning) when the file is unreadable or not ``key``'s."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) == key:
                features = Features(z["features"])
                return Stats.of(features), features
        reason = "it holds another key"
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        reason = f"it is unreadable ({e})"
    warnings.warn(f"recomputing FID reference features {path}: {reason}", stacklevel=4)
    return None


@contextlib.contextmanager
def _locked(path: Path, blocking: bool = True):
    """Hold an exclusive lock on ``path.lock`` (released when the holder exits or dies); yields False when
    ``blocking`` is off and another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_features(source: Source, name: str, resolution: int, num_images: int, cache_dir=None,
                    fingerprint: str | None = None, mode: str = "clean", **kwargs) -> tuple[Stats, Features]:
    """Statistics and features of the first ``num_images`` images of ``source`` under FID protocol ``mode``: from
    the cache when present, else computed (``kwargs`` go to ``extract_features``) and stored, ``name`` (what
    ``vqgen cache`` shows) with them.
    A generator source needs ``fingerprint``."""
    key = cache_key(source_fingerprint(source, num_images, fingerprint), resolution, num_images, mode)
    path = cache_path(cache_dir or default_cache_dir(), resolution, num_images, key)
    with _locked(path):  # a second process waits here for the first's entry instead of computing it again
        if path.exists() and (cached := _read(path, key)) is not None:
            os.utime(path)  # last use, for `vqgen cache clear --older-than`
            return cached
        features = extract_features(source, num_images=num_images, mode=mode, **kwargs)
        stats = Stats.of(features)
        meta = {"name": name, "resolution": resolution, "num_images": stats.num_images, "mode": mode,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                # the features only: their statistics take a fraction of a second, a 2048^2 covariance 32 MiB
                np.savez(f, key=key, features=features.array, meta=json.dumps(meta))
            os.replace(tmp, path)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):
                e.needed_bytes, e.filename = features.array.nbytes, e.filename or str(path)
            raise
    return stats, features


def reference_stats(*args, **kwargs) -> Stats:
    """The statistics of :func:`cached_features`."""
    return cached_features(*args, **kwargs)[0]


def reference_features(*args, **kwargs) -> Features:
    """The features of :func:`cached_features` (for KID and precision/recall)."""
    return cached_features(*args, **kwargs)[1]


def cache_entries(cache_dir=None) -> list[dict]:
    """Every entry of the cache: path, bytes, last use (seconds since the epoch) and what it holds."""
    entries = []
    for path in sorted(Path(cache_dir or default_cache_dir()).glob(f"*{SUFFIX}")):
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            meta = {"name": "(unreadable)"}
        st = path.stat()
        entries.append({"path": str(path), "bytes": st.st_size, "last_used": st.st_mtime, **meta})
    return entries


def clear_cache(cache_dir=None, older_than_days: float | None = None) -> tuple[list[str], list[str]]:
    """Remove entries (all, or those unused for ``older_than_days``); returns (removed, skipped because another
    process is computing or reading them)."""
    removed, busy = [], []
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    for entry in cache_entries(cache_dir):
        if cutoff is not None and entry["last_used"] >= cutoff:
            continue
        path = Path(entry["path"])
        with _locked(path, blocking=False) as free:
            if not free:
                busy.append(str(path))
                continue
            path.unlink(missing_ok=True)
            Path(f"{path}.lock").unlink(missing_ok=True)
        removed.append(str(path))
    return removed, busy
