"""Files a later stage or a resume trusts are written whole or not at all: a failure mid-write keeps the old file."""
import errno
import json
import os

import pytest

from common import atomic
from common.atomic import write_atomic
from common.config_loader import save_config
from common.runtime import MetricsLog
from stage1_tokenizer.config import TokenizerConfig
from study.report import write_report
from study.sweep import Sweep, SweepConfig
from tests.helpers import fake_run


@pytest.fixture
def failing_disk(monkeypatch):
    """Make the next atomic write fail after its bytes went to the temporary file, as a kill or a full disk would."""
    def fail(fd):
        raise OSError(28, "No space left on device")
    return lambda: monkeypatch.setattr(atomic.os, "fsync", fail)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, failing_disk):
    path = tmp_path / "eval.json"
    write_atomic(path, '{"rfid": 1.0}')
    assert json.loads(path.read_text()) == {"rfid": 1.0}
    failing_disk()
    with pytest.raises(OSError, match="No space"):
        write_atomic(path, '{"rfid": 2.0, "usage": 0.5}')
    assert json.loads(path.read_text()) == {"rfid": 1.0} and leftovers(tmp_path) == []
    with pytest.raises(OSError):
        write_atomic(tmp_path / "new.json", b"{}")
    assert not (tmp_path / "new.json").exists()


def test_metrics_truncation_on_resume_never_loses_the_log(tmp_path, failing_disk):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step})
    failing_disk()
    with pytest.raises(OSError):
        log.truncate_after(1)
    assert [r["step"] for r in log.read()] == [1, 2, 3]


def test_the_resolved_config_is_kept_whole(tmp_path, failing_disk):
    save_config(TokenizerConfig(), tmp_path / "config.yaml")
    before = (tmp_path / "config.yaml").read_text()
    failing_disk()
    with pytest.raises(OSError):
        save_config(TokenizerConfig(), tmp_path / "config.yaml")
    assert (tmp_path / "config.yaml").read_text() == before


def test_the_report_and_the_sweeps_timings_are_kept_whole(tmp_path, failing_disk):
    runs = [fake_run(tmp_path / "runs", "vq", 256, seed) for seed in (0, 1)]
    write_report(runs, tmp_path / "report")
    results = (tmp_path / "report" / "results.json").read_text()
    sweep = Sweep(SweepConfig(quantizers=["vq"]), tmp_path / "sweep")
    run = tmp_path / "sweep" / "vq"
    run.mkdir(parents=True)
    sweep._timed(run, "tokenizer", lambda: None)
    timings = (run / "timings.json").read_text()
    failing_disk()
    with pytest.raises(OSError):
        write_report(runs, tmp_path / "report")
    with pytest.raises(OSError):
        sweep._timed(run, "gpt", lambda: None)
    assert (tmp_path / "report" / "results.json").read_text() == results
    assert (run / "timings.json").read_text() == timings
    assert leftovers(tmp_path / "report") == [] and leftovers(run) == []


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume_and_named(tmp_path, caplog):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": 0.5})
    with log.path.open("a") as f:
        f.write('{"step": 2, "lo')  # the append a SIGKILL interrupted
    assert log.read() == [{"step": 1, "loss": 0.5}]
    assert "unfinished last line" in caplog.text and "metrics.jsonl" in caplog.text
    log.truncate_after(1)  # what a resume does: the file is whole again
    assert log.path.read_text() == '{"step": 1, "loss": 0.5}\n'
    log.path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2 is not a JSON record"):
        log.read()


def test_a_result_cut_short_is_named_and_its_stage_redone(tmp_path, monkeypatch, caplog):
    """A truncated ``eval.json`` (or ``run.json``) found on resume is not trusted: the sweep says which file and
    runs the stage that writes it again; an intact one skips the stage."""
    import study.sweep as sweep_mod

    calls = []

    def train(cfg, out, resume=False, data_fit=None):
        calls.append(("train", resume))
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "run.json", json.dumps({"status": "finished"}))

    def evaluate(run, num_images, fid_mode):
        calls.append(("evaluate", num_images, fid_mode))
        write_atomic(run / "eval.json", json.dumps({"rfid": 1.0}))

    monkeypatch.setattr(sweep_mod, "train_tokenizer", train)
    monkeypatch.setattr(sweep_mod, "evaluate_tokenizer", evaluate)
    sweep = Sweep(SweepConfig(quantizers=["vq"], data="shapes", eval_images=8), tmp_path)
    run = tmp_path / "vq"
    tok = sweep.tokenizer(run, "vq", None, 0)
    assert calls == [("train", False), ("evaluate", 8, "clean")]
    sweep.tokenizer(run, "vq", None, 0)
    assert len(calls) == 2, "finished stages are skipped"
    (tok / "eval.json").write_text('{"rfid": 1.')
    (tok / "run.json").write_text('{"stat')
    with caplog.at_level("WARNING"):
        sweep.tokenizer(run, "vq", None, 0)
    assert calls[2:] == [("train", False), ("evaluate", 8, "clean")]
    assert "eval.json is unreadable" in caplog.text and "run.json is unreadable" in caplog.text
    assert json.loads((tok / "eval.json").read_text()) == {"rfid": 1.0}


def _train_cli(out, *extra):
    from tests.helpers import SMALL

    return ["train-tokenizer", "--quantizer", "vq", "--data", "shapes", "--preset", "tiny", "--output-dir", str(out),
            "--max-steps", "4", *SMALL, "data.num_images=32", "train.checkpoint_every=2", *extra]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_a_full_disk_or_unwritable_folder_stops_with_one_line_and_the_same_command_resumes(tmp_path, monkeypatch,
                                                                                          capsys, code):
    """The checkpoint writer fails (as accelerate's save_state does on a full disk): one line names the error,
    the file, the space a checkpoint needs and what is free; the earlier checkpoint stays, no partial folder is
    left, and the same command resumes from it once the disk has room."""
    from accelerate import Accelerator

    from study.cli import main

    save_state, saves = Accelerator.save_state, []

    def fails_second(self, output_dir=None, **kw):
        saves.append(output_dir)
        if len(saves) == 2:
            raise OSError(code, os.strerror(code), os.path.join(output_dir, "model.safetensors"))
        return save_state(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", fails_second)
    assert main(_train_cli(tmp_path / "run")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"vqgen: error: {os.strerror(code)} writing ") and "model.safetensors" in err
    assert "run the same command again" in err
    assert ("MiB free there" in err) == (code == errno.ENOSPC) and "needed about" in err
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000002"], checkpoints
    monkeypatch.setattr(Accelerator, "save_state", save_state)
    assert main([*_train_cli(tmp_path / "run"), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "finished"


def test_a_full_disk_at_a_small_file_names_it(tmp_path, capsys, failing_disk):
    """``write_atomic`` (configs, eval.json, run.json, reports) reports its file and size."""
    from study.cli import main

    failing_disk()
    assert main(_train_cli(tmp_path / "run")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device writing" in err and "config.yaml" in err and "MiB free there" in err


def test_a_sweep_stops_at_a_full_disk_instead_of_failing_every_run(tmp_path, monkeypatch):
    import study.sweep as sweep_mod

    tried = []

    def tokenizer(self, run, q, k, seed):
        tried.append(q)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run / "eval.json"))
    monkeypatch.setattr(sweep_mod.Sweep, "tokenizer", tokenizer)
    monkeypatch.setattr(sweep_mod, "images_per_second", lambda: 10.0)
    with pytest.raises(OSError, match="No space"):
        Sweep(SweepConfig(quantizers=["vq", "diveq"], data="shapes"), tmp_path / "sweep").run()
    assert tried == ["vq"], "the sweep stops at a full disk instead of trying every run"
