"""The report over several evaluated runs: seeds grouped as mean and std, plots, results.json."""
import json
import statistics

import pytest

from stage1_tokenizer.evaluate import evaluate_tokenizer
from stage1_tokenizer.train import train_tokenizer
from study.report import write_report
from tests.helpers import fake_run, small_config


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for seed in (0, 1):
        cfg = small_config("model.resolution=32", "train.max_steps=4", "train.checkpoint_every=100",
                           f"train.seed={seed}", "train.sample_every=4", "data.num_images=64")  # 4 steps = 1 epoch
        train_tokenizer(cfg, root / f"vq-s{seed}")
        runs.append(root / f"vq-s{seed}")
    return runs


def test_report_groups_runs_and_reports_mean_and_std(two_runs, tmp_path):
    for run in two_runs:
        if not (run / "eval.json").exists():
            evaluate_tokenizer(run, num_images=24, batch_size=12)
    summary = write_report(two_runs, tmp_path / "report")
    rfids = [json.loads((r / "eval.json").read_text())["rfid"] for r in two_runs]
    assert summary["vq"]["rfid"]["n"] == 2
    assert summary["vq"]["rfid"]["mean"] == pytest.approx(statistics.fmean(rfids))
    assert summary["vq"]["rfid"]["std"] == pytest.approx(statistics.stdev(rfids))
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| vq | 2 |" in text and "±" in text
    for png in ("usage_curves.png", "usage_epoch_curves.png", "rfid_per_quantizer.png", "code_frequencies.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000
    assert json.loads((tmp_path / "report" / "results.json").read_text()) == summary


def test_report_refuses_non_runs(tmp_path):
    with pytest.raises(ValueError, match="not a run directory"):
        write_report([tmp_path], tmp_path / "out")


def test_report_header_says_how_the_input_was_fitted(tmp_path):
    runs = [fake_run(tmp_path / "runs", q, 64, 0) for q in ("vq", "diveq")]
    line = "data/x: 10 images (all looked at): colour, 64 px -> tokenizer in_channels=3, resolution 64 px"
    for run in runs:  # both runs share the data: the line appears once
        (run / "run.json").write_text(json.dumps({"status": "finished", "data_fit": {"message": line}}))
    write_report(runs, tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert text.count(f"Input: {line}") == 1 and text.index("Input:") < text.index("| vq")
