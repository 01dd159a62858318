"""Experiment tracking: accelerate's TensorBoard tracker receives every logged scalar and the sample grids."""
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.tracking import flat_config, trackers_for
from stage1_tokenizer.train import train_tokenizer
from stage2_prior.train import train_prior
from tests.helpers import prior_config, small_config, tiny_tokenizer_run


def _events(folder):
    (run,) = [p for p in folder.iterdir() if p.is_dir()]
    assert list(run.glob("events.out.tfevents.*")), "no event file"
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return run.name, acc


def test_tokenizer_run_writes_event_files_with_the_logged_scalars_and_grids(tmp_path):
    out = tmp_path / "tok"
    train_tokenizer(small_config("train.max_steps=5", "train.log_every=1", "train.sample_every=5",
                                 "train.checkpoint_every=1000", "data.num_images=64", "train.report_to=tensorboard",
                                 "schedule.drift_every=2"), out)
    name, acc = _events(out / "logs")
    assert name == "tok"  # default run name: the run directory's
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tags = acc.Tags()["scalars"]
    for key in ("loss", "mse", "q_loss", "usage", "perplexity", "lr", "replaced", "drift"):
        assert key in tags, (key, tags)
        logged = {e.step: e.value for e in acc.Scalars(key)}
        expected = {r["step"]: r[key] for r in records if key in r}
        assert logged.keys() == expected.keys() and all(abs(logged[s] - v) < 1e-5 * max(1, abs(v))
                                                        for s, v in expected.items()), key
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4, 5]
    (image,) = acc.Images("reconstructions")
    assert image.step == 5 and image.width > 0


def test_prior_run_is_its_own_tracker_run_named_as_asked(tmp_path):
    tok = tiny_tokenizer_run(tmp_path / "tok", "train.max_steps=2")
    train_prior(prior_config("gpt", tok, "train.max_steps=3", "train.sample_every=3", "train.report_to=tensorboard",
                             "train.run_name=vq-K32-s0-gpt"), tmp_path / "gpt")
    name, acc = _events(tmp_path / "gpt" / "logs")
    assert name == "vq-K32-s0-gpt"
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3] and "p_keep" in acc.Tags()["scalars"]
    assert acc.Images("samples")[0].step == 3
    assert not (tmp_path / "tok" / "logs").exists(), "report_to defaults to none"


def test_tracker_choice_is_checked_before_anything_runs(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown report_to 'tensorbord'"):
        trackers_for("tensorbord")
    with pytest.raises(ValueError, match="unknown report_to"):
        train_tokenizer(small_config("train.report_to=mlfow"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    monkeypatch.setattr("common.tracking._installed", lambda name: name == "tensorboard")
    assert trackers_for("all") == ["tensorboard"] and trackers_for("none") == []
    with pytest.raises(ValueError, match="pip install wandb"):
        trackers_for("wandb")
    flat = flat_config({"train": {"lr": 1e-3, "betas": [0.9, 0.95], "run_name": None}, "kind": "gpt"})
    assert flat == {"train.lr": 1e-3, "train.betas": "[0.9, 0.95]", "train.run_name": "none", "kind": "gpt"}
