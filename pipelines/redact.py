"""What an exported or published folder may say about where it came from: names, never local paths.

A dataset is named by a Hugging Face Hub dataset id (``ylecun/mnist``) or a plain name; run directories and
image folders are reduced to their last component, so nothing of the user's file system reaches a file
that may be uploaded.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path, PurePath

from huggingface_hub.utils import HFValidationError, validate_repo_id

HUB_NAMES = {"mnist": "ylecun/mnist"}  # bundled datasets that are the Hub's
PATH_KEYS = ("source", "tokenizer", "tokenizer_run", "prior_run", "output_dir", "archive", "data")
TEXT_SUFFIXES = {".json", ".md", ".yaml", ".yml", ".txt", ".py"}


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is a Hub dataset id (``owner/name``), which the Hub links to."""
    if name.count("/") != 1 or name.startswith((".", "/", "~")) or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def last_component(value: str) -> str:
    """``/home/me/data/train`` -> ``train``; ``hf:/home/me/set`` -> ``hf:set``; names are kept."""
    prefix, rest = ("hf:", value[3:]) if value.startswith("hf:") else ("", value)
    if "/" not in rest and "\\" not in rest:
        return value
    return prefix + (PurePath(rest.rstrip("/\\")).name or rest)


def dataset_name(source: str, name: str | None = None) -> str:
    """The name a dataset is published under: ``name`` if given, the Hub id of a bundled set, else the last
    component of its path."""
    if name:
        return name
    return HUB_NAMES.get(source, last_component(source))


def _looks_like_path(value: str) -> bool:
    return bool(re.match(r"^(hf:)?(/|~|[A-Za-z]:[\\/])", value))


def redact(obj, key: str = ""):
    """A copy of a JSON-like ``obj`` whose local paths (absolute ones anywhere, any under a path-valued key)
    are reduced to their last component."""
    if isinstance(obj, dict):
        return {k: redact(v, k) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, key) for v in obj]
    if isinstance(obj, str) and (_looks_like_path(obj) or (key in PATH_KEYS and not is_hub_id(obj))):
        return last_component(obj)
    return obj


def local_roots(*extra: str | Path) -> list[str]:
    """Absolute paths that must never appear in an uploaded file: home, the temp folder, the given folders."""
    roots = {str(Path.home()), tempfile.gettempdir(), os.getcwd(), *(str(Path(p).resolve()) for p in extra)}
    return sorted(r for r in roots if len(r) > 1)


def find_local_paths(folder: str | Path, roots: list[str]) -> list[str]:
    """``file: path`` for every text file under ``folder`` that mentions one of ``roots``."""
    hits = []
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.suffix in TEXT_SUFFIXES:
            text = path.read_text(errors="replace")
            hits += [f"{path.relative_to(folder)}: {root}" for root in roots if root in text]
    return hits
