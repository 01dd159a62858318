"""Files written whole or not at all: a temporary name beside the target, flushed to disk, then renamed into place."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that a kill or an error mid-write leaves the old file (or none), never a part.

    The temporary file carries the writer's PID, so two processes never share one; it is removed on failure.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            e.needed_bytes, e.filename = len(data), e.filename or str(path)
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


# a write that cannot succeed until the user acts: no space, a quota, no permission, a read-only file system
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def disk_error_line(e: BaseException) -> str | None:
    """One line for a write that failed for want of space or permission (what, where, how much it needed and
    how much is free there); None for any other error."""
    if not isinstance(e, OSError) or e.errno not in DISK_ERRNOS:
        return None
    where = Path(e.filename or ".")
    folder = next((p for p in (where, *where.parents) if p.is_dir()), Path("."))
    line = f"{e.strerror or os.strerror(e.errno)} writing {where}"
    if getattr(e, "needed_bytes", None):
        line += f" (it needed about {e.needed_bytes / 2**20:.1f} MiB"
        line += f", {shutil.disk_usage(folder).free / 2**20:.1f} MiB free there)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ")"
    return (line + ". Finished work and the last complete checkpoint are kept: free space (or fix the permissions) "
            "and run the same command again to resume.")
