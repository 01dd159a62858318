"""Per-run locks: one holder at a time, a gone holder's lock taken over, two sweeps on one folder train each run once."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

from common.run_lock import RunLock
from tests.helpers import subprocess_env


def _write(path, **record):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                                "heartbeat": time.time(), "token": "other", **record}))


def test_one_holder_at_a_time_and_the_lock_names_it(tmp_path):
    path = tmp_path / "run" / ".lock"
    first, second = RunLock(path), RunLock(path)
    with first as held:
        assert held and json.loads(path.read_text())["pid"] == os.getpid()
        assert second.acquire() is False
        assert f"{socket.gethostname()}:{os.getpid()} since" in second.describe()
    assert not path.exists(), "released on leaving the block"
    assert second.acquire() is True
    second.release()


def test_a_gone_holder_is_taken_over_a_live_one_never(tmp_path):
    path = tmp_path / ".lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write(path, pid=int(dead.stdout))  # this host, a PID that no longer runs
    lock = RunLock(path)
    assert lock.acquire() and json.loads(path.read_text())["token"] == lock.token
    lock.release()
    _write(path, host="node-17", pid=1)  # another host, fresh heartbeat: its PID says nothing here
    assert RunLock(path).acquire() is False
    _write(path, host="node-17", pid=1, heartbeat=time.time() - 700)  # its lease ran out
    lock = RunLock(path)
    assert lock.acquire()
    lock.release()
    path.write_text('{"host": "node')  # a lock file cut short reads as a long-gone holder
    lock = RunLock(path)
    assert lock.acquire()
    lock.release()


def test_the_holder_refreshes_its_heartbeat(tmp_path):
    path = tmp_path / ".lock"
    with RunLock(path, lease_s=0.4) as held:
        assert held
        first = json.loads(path.read_text())["heartbeat"]
        time.sleep(0.5)
        record = json.loads(path.read_text())
        assert record["heartbeat"] > first and not RunLock(path, lease_s=0.4).gone(record)


WORKER = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, os.getcwd())
    import study.sweep as sweep_mod

    log = sys.argv[2]

    def tokenizer(self, run, q, k, seed):  # as the real stage: a finished run is not trained again
        tok = run / "tokenizer"
        if (tok / "run.json").exists():
            return tok
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {run.name}\\n")
        time.sleep(0.4)
        tok.mkdir(parents=True, exist_ok=True)
        (tok / "config.yaml").write_text("quantizer: {name: %s, num_codes: 8}\\ntrain: {seed: %d}\\n" % (q, seed))
        (tok / "eval.json").write_text(json.dumps({"rfid": 1.0, "usage": 0.5}))
        (tok / "metrics.jsonl").write_text(json.dumps({"step": 1, "usage": 0.5}) + "\\n")
        (tok / "run.json").write_text(json.dumps({"status": "finished"}))
        return tok

    sweep_mod.Sweep.tokenizer = tokenizer
    sweep_mod.images_per_second = lambda: 10.0
    cfg = sweep_mod.SweepConfig(quantizers=["vq", "ema", "simvq", "diveq"], seeds=[0, 1], priors=[])
    sweep = sweep_mod.Sweep(cfg, sys.argv[1])
    sweep.poll_s = 0.2
    print(json.dumps(sweep.run()))
""")


def test_two_sweeps_on_one_folder_train_every_run_once_and_both_report_all(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out, log = tmp_path / "sweep", tmp_path / "trained.log"
    env = subprocess_env()
    procs = [subprocess.Popen([sys.executable, str(script), str(out), str(log)], env=env, cwd=os.getcwd(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-2000:] for r in results]
    trained = [line.split() for line in log.read_text().splitlines()]
    names = [name for _, name in trained]
    assert sorted(names) == sorted(set(names)) and len(names) == 8, "every run trained exactly once"
    assert len({pid for pid, _ in trained}) == 2, "both processes trained runs"
    for stdout, stderr in results:
        assert len(json.loads(stdout.strip().splitlines()[-1])["finished"]) == 8, "each report has every run"
    assert any("moving on to the next free run" in stderr for _, stderr in results)
    assert not list(out.rglob(".lock")), "every lock released"
