"""The built wheel is the product: installed outside the checkout it carries its presets and runs."""
import os
import shutil
import site
import subprocess
import sys

import pytest

from tests.helpers import ROOT, project_packages

PACKAGES = project_packages()


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python argv prefix, env, target) for the wheel installed into a fresh --target folder.

    ``python -S`` skips ``.pth`` processing, so the checkout's editable install is invisible: only the
    wheel's files and the already installed dependencies (plain ``PYTHONPATH`` entries) are importable.
    """
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy, so the build leaves nothing (build/, egg-info) in the checkout
    for package in PACKAGES:
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(tmp / "dist")], capture_output=True, text=True, timeout=300,
                           cwd=tmp)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("vqgen-*.whl")
    target = tmp / "target"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-3000:]
    deps = os.pathsep.join(site.getsitepackages())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=f"{target}{os.pathsep}{deps}", OMP_NUM_THREADS="1", VQGEN_CACHE=str(tmp / "cache"))
    work = tmp / "elsewhere"
    work.mkdir()
    return [sys.executable, "-S", str(target / "bin" / "vqgen")], env, target, work


def _run(installed, *args, timeout=300):
    cmd, env, _, work = installed
    return subprocess.run([*cmd, *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_ships_every_preset_and_imports_from_itself(installed):
    cmd, env, target, work = installed
    probe = subprocess.run([sys.executable, "-S", "-c",
                            "import pipelines, common.config_loader as c, stage2_prior.config as p;"
                            "from study.sweep import load_sweep_config;"
                            "print(pipelines.__file__); print(c.preset_names(c.presets('stage1_tokenizer', 'tokenizer')));"
                            "print(c.preset_names(c.presets('stage2_prior', 'gpt')));"
                            "print(load_sweep_config('study').quantizers[:2])"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    where, tokenizer, gpt, study = probe.stdout.splitlines()
    assert where.startswith(str(target)), "the installed wheel, not the checkout, must be imported"
    assert "tiny" in tokenizer and "celeba-hq" in tokenizer and "tiny-nsvq2026" in tokenizer
    assert "afhq" in gpt and "tiny" in gpt
    assert study.startswith("[")


def test_installed_cli_runs_outside_the_checkout(installed):
    _, _, _, work = installed
    version = _run(installed, "--version")
    assert version.returncode == 0 and version.stdout.strip().startswith("vqgen 0."), version.stderr
    listed = _run(installed, "quantizers")
    assert listed.returncode == 0 and "diveq" in listed.stdout and "rvq" in listed.stdout, listed.stderr
    sweep_help = _run(installed, "sweep", "--help")
    assert sweep_help.returncode == 0 and "--shard" in sweep_help.stdout
    train = _run(installed, "train-tokenizer", "--preset", "tiny", "--data", "shapes", "--max-steps", "2",
                 "--output-dir", "run", "data.num_images=64", "train.batch_size=8")
    assert train.returncode == 0, train.stderr[-3000:]
    assert (work / "run" / "tokenizer" / "config.json").exists() and (work / "run" / "config.yaml").exists()
    unknown = _run(installed, "train-tokenizer", "--preset", "nope", "--output-dir", "x")
    assert unknown.returncode == 2 and "known presets: celeba-hq, mnist" in unknown.stderr
