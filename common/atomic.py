"""Files written whole or not at all: a temporary name beside the target, flushed to disk, then renamed into place."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that a kill or an error mid-write leaves the old file (or none), never a part.

    The temporary file carries the writer's PID, so two processes never share one; it is removed on failure.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: str | Path, default=None):
    """The JSON in ``path``; ``default`` when the file is missing, and also, with a warning naming it, when it is
    cut short or corrupt (a copy interrupted, a disk error): the stage that writes it then runs again, instead of
    a later one failing on it or trusting half a result."""
    path = Path(path)
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        logger.warning("%s is unreadable (%s); redoing the stage that writes it", path, e)
        return default
