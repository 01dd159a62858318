"""The sweep: end to end, resume after a kill, archives, shards, presets, failures in a row."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import DiffusionPipeline

from stage1_tokenizer.config import load_tokenizer_config
from stage2_prior.config import load_prior_config
from tests.helpers import kill_when, subprocess_env

# --- the sweep ---------------------------------------------------------------------------------------
SMALL_SWEEP = ["eval_images=8", "gfid_images=8", "ref_images=8", "sample_batch_size=4",
               'tokenizer=["model.resolution=16", "model.block_out_channels=[16, 16]", "model.latent_channels=8", '
               '"model.vq_embed_dim=8", "model.norm_num_groups=4", "quantizer.num_codes=32", "data.num_images=64", '
               '"train.batch_size=16", "train.checkpoint_every=2", "train.sample_every=1000"]',
               'gpt=["gpt.n_layer=1", "gpt.n_embd=32", "gpt.n_head=2", "train.batch_size=16", "sample.num_samples=4"]',
               'ldm=["ldm.block_out_channels=[32, 32]", "ldm.norm_num_groups=8", "ldm.num_inference_steps=3", '
               '"ldm.attention_levels=[1]", "train.batch_size=16", "sample.num_samples=4"]',
               "quantizer_options={transvq: {replacement: reservoir}}"]  # transvq cannot: a run that fails


def _sweep(out: Path, *extra: str, quantizers: str = "vq,transvq,diveq") -> list[str]:
    return [sys.executable, "-m", "study.cli", "sweep", "--output-dir", str(out), "--data", "shapes",
            "--quantizers", quantizers, "--max-steps", "6", *SMALL_SWEEP, *extra]


def test_sweep_runs_end_to_end_survives_a_kill_and_records_a_failure(tmp_path):
    env = subprocess_env(VQGEN_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    marker = out / "diveq" / "tokenizer" / "checkpoints" / "step-00000002" / "COMPLETE"
    kill_when(_sweep(out), marker, env)
    assert marker.exists() and not (out / "report.md").exists(), "the sweep must be killed mid-way"
    vq_done = (out / "vq" / "tokenizer" / "run.json").stat().st_mtime_ns
    resumed = subprocess.run(_sweep(out), env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 1, resumed.stderr[-3000:]  # 1: a run failed (transvq), the rest finished
    assert "resumed from" in resumed.stderr + resumed.stdout
    assert (out / "vq" / "tokenizer" / "run.json").stat().st_mtime_ns == vq_done, "finished stages are skipped"
    results = json.loads((out / "results.json").read_text())
    assert "Inception images" in resumed.stderr and "smoke run" in results["not_comparable"].lower()
    for q in ("vq", "diveq"):
        assert results[q]["gpt"]["gfid"]["mean"] > 0 and results[q]["ldm"]["gfid"]["mean"] > 0
        assert results[q]["rfid"]["mean"] > 0
        assert (out / q / "pipelines" / "gpt" / "model_index.json").exists()
    assert "reservoir" in results["transvq"]["error"] and (out / "transvq" / "error.txt").exists()
    report = (out / "report.md").read_text()
    assert "## Failed" in report and "transvq" in report and "gFID GPT" in report
    for png in ("gpt_gfid_per_quantizer.png", "rfid_per_quantizer.png", "usage_curves.png"):
        assert (out / png).exists(), png
    sample_grid = re.search(r"!\[vq / gpt\]\(([^)]+)\)", report).group(1)  # inside the sweep folder: linked in place
    assert not sample_grid.startswith("grids/") and (out / sample_grid).exists()
    loaded = DiffusionPipeline.from_pretrained(out / "vq" / "pipelines" / "ldm")
    assert type(loaded).__name__ == "LDMPipeline"


def test_archived_runs_are_reported_without_rerunning(tmp_path):
    """A study resumes across sessions from committed per-run results: archived runs are read, not retrained."""
    name = "vq-K32-s0"  # archived runs carry quantizer, K and seed
    env = subprocess_env(VQGEN_CACHE=str(tmp_path / "cache"))
    archive = tmp_path / "archive"
    first = subprocess.run(_sweep(tmp_path / "a", f"archive={archive}", "--report-to", "tensorboard",
                                  quantizers="vq"), env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    for stage in ("tokenizer", "gpt", "ldm"):  # one tracker run per stage, named after the sweep run
        assert list((tmp_path / "a" / name / stage / "logs" / f"{name}-{stage}").glob("events.out.tfevents.*")), stage
    assert (archive / name / "ARCHIVED").exists() and not list(archive.rglob("*.safetensors"))
    second = subprocess.run(_sweep(tmp_path / "b", f"archive={archive}", quantizers="vq"), env=env,
                            capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert not (tmp_path / "b" / name).exists(), "an archived run must not be retrained"
    a = json.loads((tmp_path / "a" / "results.json").read_text())["vq"]
    b = json.loads((tmp_path / "b" / "results.json").read_text())["vq"]
    assert a["gpt"] == b["gpt"] and a["rfid"] == b["rfid"]
    assert (tmp_path / "b" / "grids" / f"{name}-ldm.png").exists()
    generation = json.loads((archive / name / "generation.json").read_text())
    for kind in ("gpt", "ldm"):  # each prior's held-out metric and curves travel with the archive
        assert generation[kind]["validation_plot"] == f"validation_{kind}.png"
        assert (archive / name / f"validation_{kind}.png").exists()
    assert "val_bits_per_token" in generation["gpt"] and "val_denoising_loss" in generation["ldm"]


def test_a_smoke_sweep_caps_its_evaluation_and_says_what_it_costs(tmp_path, monkeypatch):
    from dataclasses import replace

    import study.sweep as sweep_mod

    full = sweep_mod.SweepConfig(eval_images=300, gfid_images=1000, ref_images=5000)
    assert full.evaluation_counts() == (300, 1000, 5000) and not full.smoke
    smoke = replace(full, max_steps=20)
    assert smoke.smoke and smoke.evaluation_counts() == (100, 100, 100)
    assert replace(full, max_steps=20, smoke_images=0).evaluation_counts() == (300, 1000, 5000)
    assert replace(full, max_steps=20, ref_images=None, gfid_images=50).evaluation_counts() == (100, 50, 50)
    with pytest.raises(ValueError, match="smoke_images"):
        replace(full, smoke_images=-1)
    monkeypatch.setattr(sweep_mod, "images_per_second", lambda: 10.0)
    line = sweep_mod.Sweep(smoke, tmp_path).evaluation_cost(2)
    # held-out 100 + references 100 once, then 2 runs x (100 reconstructions + 2 priors x 100 samples): 800 at 10/s
    assert "= 800 Inception images, about 1.3 min" in line and "not comparable" in line
    assert "not comparable" not in sweep_mod.Sweep(full, tmp_path).evaluation_cost(2)
    # a guidance curve samples every scale but the priors' own (1), whose point is the main score: 3 sets per prior
    curve = replace(smoke, conditional=True, guidance_scales=[0.0, 1.0, 2.0])
    assert "= 1,600 Inception images" in sweep_mod.Sweep(curve, tmp_path).evaluation_cost(2)


def test_archived_run_names_always_carry_quantizer_k_and_seed():
    """With an archive, narrowed sweeps (one K, one seed) still name runs in full, so two of them into one archive
    never collide on a name or resume each other's checkpoints; without one, names stay short."""
    from study.sweep import SweepConfig

    def names(**kw):
        return [name for name, *_ in SweepConfig(quantizers=["nsvq-noise"], **kw).runs()]

    assert names(num_codes=[8192], seeds=[2], archive="a") == ["nsvq-noise-K8192-s2"]
    assert names(seeds=[1], archive="a") == ["nsvq-noise-K256-s1"]  # K of the tiny preset
    assert names(seeds=[1], archive="a", tokenizer=["quantizer.num_codes=64"]) == ["nsvq-noise-K64-s1"]
    assert names(num_codes=[512, 8192], seeds=[0, 1], archive="a") == [
        "nsvq-noise-K512-s0", "nsvq-noise-K8192-s0", "nsvq-noise-K512-s1", "nsvq-noise-K8192-s1"]
    assert set(names(num_codes=[8192], seeds=[1], archive="a")).isdisjoint(names(num_codes=[8192], seeds=[2], archive="a"))
    assert names(num_codes=[8192], seeds=[2]) == ["nsvq-noise"]
    staged = SweepConfig(quantizers=["ns-vq"], preset="tiny-nsvq2026", num_codes=[512], archive="a").runs()
    assert [name for name, *_ in staged] == ["ns-vq-freeze240-K512-s0"]  # never the plain ns-vq run's folder


def test_the_study_presets_load_and_never_share_an_archive():
    """Each study preset's runs go to an archive of its own: two presets writing the same names (their step counts
    or K are not all in the names) into one archive would resume, or be reported as seeds of, each other's runs."""
    from importlib.resources import files

    from study.sweep import load_sweep_config

    names = sorted(p.name[:-5] for p in files("study").joinpath("presets", "sweep").iterdir() if p.name.startswith("study"))
    assert {"study", "study-usage", "study-nsvq2026", "study-plateau"} <= set(names)
    archives = {}
    for name in names:
        cfg = load_sweep_config(name)
        assert cfg.runs(), name
        assert cfg.archive not in archives, f"{name} shares {cfg.archive} with {archives.get(cfg.archive)}"
        archives[cfg.archive] = name
    plateau, study = load_sweep_config("study-plateau"), load_sweep_config("study")
    assert _tokenizer_steps(plateau) > _tokenizer_steps(study)  # the plateau check trains the study's runs longer
    assert not Path(plateau.archive).is_relative_to("docs/study"), "the study's report globs docs/study/runs*"
    assert plateau.priors == [] and plateau.quantizer_options == study.quantizer_options


def _tokenizer_steps(cfg) -> int:
    """The tokenizer steps a sweep config trains: its preset with its overrides, resolved."""
    return load_tokenizer_config(cfg.preset, cfg.tokenizer).train.max_steps


def test_demo_converged_is_the_demo_trained_longer():
    """``demo-converged`` differs from ``demo`` only in the tokenizer's and the GPT's step counts, both longer, so its
    gFID is comparable with the demo's: same quantizers, data, LDM, sampling and image counts."""
    from dataclasses import asdict

    from study.sweep import load_sweep_config

    demo, long = load_sweep_config("demo"), load_sweep_config("demo-converged")
    differ = {k for k, v in asdict(demo).items() if asdict(long)[k] != v}
    assert differ <= {"tokenizer", "gpt"}
    assert _tokenizer_steps(long) > _tokenizer_steps(demo)
    gpt_demo, gpt_long = (load_prior_config("gpt", c.gpt_preset, c.gpt) for c in (demo, long))
    assert gpt_long.train.max_steps > gpt_demo.train.max_steps
    assert gpt_long.gpt == gpt_demo.gpt and gpt_long.sample == gpt_demo.sample  # the same model, sampled alike


def test_a_sweep_without_priors_archives_and_reports_tokenizers_only(tmp_path, monkeypatch):
    """``priors: []`` (the usage study at large K): no prior is trained, and the archive and report need no gFID."""
    import yaml

    import study.sweep as sweep_mod

    def fake_tokenizer(self, run, q, k, seed):
        tok = run / "tokenizer"
        tok.mkdir(parents=True)
        (tok / "config.yaml").write_text(yaml.safe_dump({"quantizer": {"name": q, "num_codes": k}, "train": {"seed": seed}}))
        (tok / "eval.json").write_text(json.dumps({"rfid": 10.0 + seed, "usage": 0.5, "psnr": 20.0}))
        (tok / "metrics.jsonl").write_text(json.dumps({"step": 1, "usage": 0.5}) + "\n")
        (tok / "run.json").write_text(json.dumps({"status": "finished"}))
        (run / "timings.json").write_text("{}")
        return tok

    priors = []
    monkeypatch.setattr(sweep_mod.Sweep, "tokenizer", fake_tokenizer)
    monkeypatch.setattr(sweep_mod.Sweep, "prior", lambda self, run, tok, kind, seed: priors.append(kind))
    cfg = sweep_mod.SweepConfig(quantizers=["vq", "ns-vq"], num_codes=[8192], seeds=[0, 1], priors=[],
                                archive=str(tmp_path / "archive"))
    result = sweep_mod.Sweep(cfg, tmp_path / "out").run()
    assert priors == [] and not result["failed"] and len(result["finished"]) == 4
    archived = tmp_path / "archive" / "ns-vq-K8192-s1"
    assert (archived / "ARCHIVED").exists() and not (archived / "generation.json").read_text().strip("{} \n")
    assert "ns-vq" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(ValueError, match="unknown prior.*gan"):
        sweep_mod.SweepConfig(priors=["gan"])


def test_shards_split_a_study_and_each_reports_every_archived_run(tmp_path, monkeypatch):
    """``--shard I/N`` runs every N-th run; two shards over one archive cover the study once between them."""
    import study.sweep as sweep_mod

    trained, reported = [], {}
    monkeypatch.setattr(sweep_mod.Sweep, "tokenizer", lambda self, run, q, k, seed: trained.append(run.name) or run)
    monkeypatch.setattr(sweep_mod.Sweep, "prior", lambda self, run, tok, kind, seed: None)
    monkeypatch.setattr(sweep_mod, "archive_run", lambda run, dest: (dest.mkdir(parents=True),
                                                                     (dest / sweep_mod.ARCHIVED).write_text("")))
    monkeypatch.setattr(sweep_mod, "write_report", lambda done, out, *a, **k: reported.update({out.name: [d.name for d in done]}))
    cfg = sweep_mod.SweepConfig(quantizers=["vq", "ema", "simvq"], num_codes=[8, 16], seeds=[0],
                                archive=str(tmp_path / "archive"))
    names = [name for name, *_ in cfg.runs()]
    sweep_mod.Sweep(cfg, tmp_path / "first", shard=(0, 2)).run()
    assert trained == names[0::2] and reported["first"] == names[0::2]
    result = sweep_mod.Sweep(cfg, tmp_path / "second", shard=(1, 2)).run()
    assert sorted(result["finished"]) == sorted(names), "finished lists run names, archived ones included"
    assert trained == names[0::2] + names[1::2], "each run is trained by exactly one shard"
    assert sorted(reported["second"]) == sorted(names), "a shard reports the other shards' archived runs too"
    with pytest.raises(ValueError, match="shard 2/2"):
        sweep_mod.Sweep(cfg, tmp_path / "bad", shard=(2, 2))
    bad = subprocess.run([sys.executable, "-m", "study.cli", "sweep", "--shard", "half"], capture_output=True,
                         text=True, env=subprocess_env())
    assert bad.returncode == 2 and "--shard takes I/N" in bad.stderr


def test_sweep_under_torchrun_trains_on_both_ranks(tmp_path):
    """Two CPU processes (gloo): training stages see world size 2, the rest runs once on the main process."""
    env = subprocess_env(VQGEN_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *_sweep(out, quantizers="vq")[1:]]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    for stage in ("tokenizer", "gpt", "ldm"):
        assert json.loads((out / "vq" / stage / "run.json").read_text())["world_size"] == 2
    assert json.loads((out / "results.json").read_text())["vq"]["ldm"]["gfid"]["mean"] > 0
    assert run.stdout.count("finished: vq") == 1


def test_a_sweep_stops_when_runs_fail_in_a_row_with_the_same_error(tmp_path, monkeypatch):
    """A broken environment fails every run the same way within seconds: after ``stop_after_failures`` such runs in
    a row the sweep stops instead of marking the rest failed; a different error in between resets the count."""
    import study.sweep as sweep_mod

    errors = {"vq": "boom", "ema": "other", "simvq": "boom", "diveq": "boom", "rotation": "boom"}
    tried = []

    def failing_tokenizer(self, run, q, k, seed):
        tried.append(q)
        raise RuntimeError(f"{errors[q]} in {run}")  # each message names its own run's folder

    monkeypatch.setattr(sweep_mod.Sweep, "tokenizer", failing_tokenizer)
    cfg = sweep_mod.SweepConfig(quantizers=list(errors), priors=[], stop_after_failures=2)
    result = sweep_mod.Sweep(cfg, tmp_path / "out").run()
    assert tried == ["vq", "ema", "simvq", "diveq"]  # vq/ema/simvq differ in a row; simvq + diveq: two alike, stop
    assert list(result["failed"]) == tried and "RuntimeError: boom in" in result["stopped"]
    assert not (tmp_path / "out" / "rotation").exists()  # never started, so nothing marks it failed
    assert "runs in a row failed" in (tmp_path / "out" / "report.md").read_text()

    tried.clear()
    never = sweep_mod.SweepConfig(quantizers=list(errors), priors=[], stop_after_failures=0)
    assert sweep_mod.Sweep(never, tmp_path / "never").run()["stopped"] is None and tried == list(errors)
    with pytest.raises(ValueError, match="stop_after_failures must be >= 0"):
        sweep_mod.SweepConfig(stop_after_failures=-1)


def test_a_conditional_sweep_scores_a_guidance_curve_and_reports_it(tmp_path):
    """``conditional: true`` trains both priors on the labels with label dropout; ``guidance_scales`` scores each
    prior at every scale (class-balanced samples) into generation.json and the report's guidance tables; the
    prior's own scale (1) is its main score, not sampled twice."""
    out = tmp_path / "cond"
    run = subprocess.run(_sweep(out, "conditional=true", "guidance_scales=[0.0, 1.0]", quantizers="vq"),
                         capture_output=True, text=True, env=subprocess_env(), timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    generation = json.loads((out / "vq" / "tokenizer" / "generation.json").read_text())
    for kind in ("gpt", "ldm"):
        assert json.loads((out / "vq" / kind / "run.json").read_text())["num_classes"] == 4
        curve = generation[kind]["curve"]
        assert [p["guidance_scale"] for p in curve] == [0.0, 1.0] and all(p["gfid"] > 0 for p in curve)
        assert curve[1]["gfid"] == generation[kind]["gfid"] and curve[0]["gfid"] != curve[1]["gfid"]
        timings = json.loads((out / "vq" / "timings.json").read_text())
        assert f"gfid_{kind}_s0" in timings and f"gfid_{kind}_s1" not in timings
        sidecar = json.loads((out / "vq" / "pipelines" / kind / "vqgen.json").read_text())
        assert sidecar["classes"] == {str(i): f"group {i}" for i in range(4)}
    report = (out / "report.md").read_text()
    assert "### Guidance: GPT prior" in report and "### Guidance: LDM prior" in report
    assert (out / "guidance_gpt.png").exists() and "lowest gFID" in report
    curve = json.loads((out / "results.json").read_text())["vq"]["ldm"]["guidance_curve"]
    assert [p["guidance_scale"] for p in curve] == [0.0, 1.0] and curve[1]["gfid"]["n"] == 1
    with pytest.raises(ValueError, match="guidance_scales need conditional"):
        from study.sweep import SweepConfig
        SweepConfig(guidance_scales=[2.0])


def test_demo_cond_is_the_demo_with_conditional_priors():
    from dataclasses import asdict

    from study.sweep import load_sweep_config

    demo, cond = load_sweep_config("demo"), load_sweep_config("demo-cond")
    assert {k for k, v in asdict(demo).items() if asdict(cond)[k] != v} == {"conditional", "guidance_scales"}
    assert cond.conditional and 1.0 in cond.guidance_scales
