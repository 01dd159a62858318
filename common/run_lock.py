"""A per-run lock for processes sharing an output folder (two sweeps, SLURM array tasks on a shared file system).

The lock is a JSON file naming its holder (host, PID, start time) and a heartbeat the holder refreshes from a
thread. Another process judges the holder gone when the holder is on its own host and the PID no longer runs, or,
on any host, when the heartbeat is older than the lease (PIDs mean nothing across hosts). A gone holder's lock is
taken over; a live holder's run is left to it. Creation is ``O_CREAT | O_EXCL`` and a takeover first renames the
stale file to a name of its own, so of two processes racing for a run exactly one gets it.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

LEASE_S = 600.0  # a heartbeat older than this means the holder is gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """``with RunLock(path) as held:`` holds ``path`` while the block runs when ``held`` is True; when another
    live process holds it, ``held`` is False and ``holder`` names that process."""

    def __init__(self, path: str | Path, lease_s: float = LEASE_S):
        self.path, self.lease_s = Path(path), float(lease_s)
        self.token = uuid.uuid4().hex
        self.holder: dict | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # --- the lock file ---------------------------------------------------------------------------
    def _record(self, started: float) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "heartbeat": time.time(),
                "token": self.token}

    def read(self) -> dict | None:
        """The holder's record, or None when there is no lock (an unreadable one reads as a long-dead holder)."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"host": "?", "pid": -1, "started": 0.0, "heartbeat": 0.0, "token": "?"}

    def gone(self, record: dict) -> bool:
        """Whether the process a record names no longer holds its lock."""
        if record.get("host") == socket.gethostname() and not _alive(int(record.get("pid", -1))):
            return True
        return time.time() - float(record.get("heartbeat", 0.0)) > self.lease_s

    def _create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._record(time.time()), f)
        return True

    def acquire(self) -> bool:
        """Take the lock (also from a gone holder); False, with ``holder`` set, when a live process has it."""
        for _ in range(3):  # a lock released or taken over between the checks: look again
            if self._create():
                self._start_heartbeat()
                return True
            record = self.read()
            if record is None:
                continue
            if not self.gone(record):
                self.holder = record
                return False
            stale = self.path.with_name(f"{self.path.name}.stale-{self.token}")
            try:
                os.rename(self.path, stale)  # only one of several takers renames it; the others see it vanish
            except FileNotFoundError:
                continue
            stale.unlink(missing_ok=True)
        self.holder = self.read()
        return False

    def _start_heartbeat(self) -> None:
        def beat():
            started = time.time()
            while not self._stop.wait(self.lease_s / 4):
                record = self.read()
                if record is None or record.get("token") != self.token:
                    return  # taken over (this process was judged gone): stop refreshing another's lock
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({**self._record(started), "started": record.get("started", started)}))
                os.replace(tmp, self.path)

        self._beat = threading.Thread(target=beat, daemon=True, name=f"heartbeat {self.path}")
        self._beat.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this process's."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        record = self.read()
        if record is not None and record.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        if self._beat is not None:
            self.release()

    def describe(self) -> str:
        """``host:pid since HH:MM`` of the holder, for the line that says a run was left to it."""
        h = self.holder or {}
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(h.get("started", 0.0))))
        return f"{h.get('host', '?')}:{h.get('pid', '?')} since {since}"
