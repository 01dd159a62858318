"""The user's cache directory for what vqgen computes once per machine (FID reference features)."""
from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(*parts: str) -> Path:
    """``$VQGEN_CACHE``, else ``$XDG_CACHE_HOME/vqgen``, else ``~/.cache/vqgen``; read at call time so a test or a
    job can point it elsewhere."""
    if os.environ.get("VQGEN_CACHE"):
        root = Path(os.environ["VQGEN_CACHE"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vqgen"
    return root.joinpath(*parts)
