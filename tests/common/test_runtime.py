"""Process runtime: intra-op threads from the CPUs the process may use, and --threads on every command."""
import sys

import pytest
import torch

from common import runtime
from stage1_tokenizer.quantizers import QUANTIZERS
from stage1_tokenizer.train import TokenizerTrainer
from stage2_prior.train import TRAINERS
from study.cli import main
from tests.helpers import ROOT, prior_config, project_packages, small_config, tiny_tokenizer_run


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_threads_follow_the_affinity_mask_not_the_machine(monkeypatch, keep_threads):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert runtime.set_threads() == 1 and torch.get_num_threads() == 1
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert runtime.set_threads() == 2 and torch.get_num_threads() == 2


@pytest.mark.parametrize("argv", [["--threads", "1", "quantizers"], ["quantizers", "--threads", "1"]])
def test_threads_option_stands_before_or_after_the_command(argv, keep_threads, capsys):
    torch.set_num_threads(2)
    assert main(argv) == 0
    assert torch.get_num_threads() == 1
    assert "diveq" in capsys.readouterr().out


def test_bad_thread_count_is_a_clear_error(keep_threads, capsys):
    assert main(["quantizers", "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err


# --- mixed precision: auto picks bf16 only where it runs natively -------------------------------------
@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, "no"), (True, False, "bf16"), (False, True, "bf16")])
def test_auto_precision_is_bf16_only_on_cpus_that_run_it_natively(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime.torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(runtime.torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(runtime.torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert runtime.resolve_precision("auto") == expected
    assert runtime.make_accelerator("auto").mixed_precision == expected
    assert runtime.resolve_precision("fp16") == "fp16"  # explicit choices are kept


def test_auto_precision_without_torchs_private_cpu_probes_is_fp32(monkeypatch):
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime.torch.backends.mps, "is_available", lambda: False)
    monkeypatch.delattr(runtime.torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(runtime.torch.cpu, "_is_amx_tile_supported")
    assert runtime.resolve_precision("auto") == "no"


def test_auto_precision_on_a_gpu_follows_its_bf16_support(monkeypatch):
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: True)
    for supported, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(runtime.torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert runtime.resolve_precision("auto") == expected


def test_unknown_precision_is_a_config_error():
    from stage1_tokenizer.config import load_tokenizer_config
    from stage2_prior.config import load_prior_config

    with pytest.raises(ValueError, match="train.mixed_precision must be one of no, fp16, bf16, auto, got 'bf32'"):
        load_tokenizer_config("tiny", ["train.mixed_precision=bf32"])
    with pytest.raises(ValueError, match="train.mixed_precision must be one of"):
        load_prior_config("gpt", "tiny", ["train.mixed_precision=half"])


# --- no host syncs in a training step ------------------------------------------------------------
PROJECT = tuple(str(ROOT / d) for d in project_packages())
SYNCING = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__format__")
QUIET = ["train.log_every=1000", "train.sample_every=1000", "train.checkpoint_every=1000", "train.max_steps=1000"]


@pytest.fixture
def count_syncs(monkeypatch):
    """Count calls that read a tensor back to the host (each a device sync on a GPU) made from vqgen's or
    accelerate's code; torch's own (e.g. Adam's CPU step counter) are not the project's."""
    calls = []

    def counting(name, real):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PROJECT) or "/accelerate/" in caller:
                calls.append((name, caller, sys._getframe(1).f_lineno))
            return real(self, *args, **kwargs)
        return wrapper

    def start():
        for name in SYNCING:
            monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
        return calls
    return start


def _syncs_over(trainer, count_syncs, first: int, second: int) -> tuple[list, list]:
    """Host reads of a run to ``first`` steps and of its continuation to ``second``: both end with one log and one
    checkpoint, so with no per-step syncs the two lists are equally long."""
    trainer.train(max_steps=1)  # warm-up outside the count (first forward: lazy init, k-means, ...)
    calls = count_syncs()
    trainer.train(max_steps=first)
    short = list(calls)
    calls.clear()
    trainer.train(max_steps=second)
    return short, list(calls)


@pytest.mark.parametrize("quantizer", [*QUANTIZERS, "vq+reservoir"])
def test_tokenizer_step_reads_nothing_back_between_logs(quantizer, tmp_path, count_syncs):
    """Every variant; SF-DiVeQ ends its warm-up inside the count, the reservoir fills every step."""
    extra = {"sf-diveq": ["quantizer.options.warmup=2"], "sf-diveq-detach": ["quantizer.options.warmup=2"],
             "vq+reservoir": ["quantizer.options.replacement=reservoir"],
             "fsq": ["quantizer.options={levels: [4, 8]}"]}.get(quantizer, [])
    quantizer = quantizer.split("+")[0]
    trainer = TokenizerTrainer(small_config(f"quantizer.name={quantizer}", "schedule.drift_every=1000", *QUIET,
                                            *extra), tmp_path / "run")
    short, long = _syncs_over(trainer, count_syncs, 3, 9)
    assert short, "the final log reads values back, so the counter must see it"
    assert len(long) == len(short), (short, long)


@pytest.mark.parametrize("kind", ["gpt", "ldm"])
def test_prior_step_reads_nothing_back_between_logs(kind, tmp_path, count_syncs):
    tok = tiny_tokenizer_run(tmp_path / "tok")
    # batch 2: the 30-odd cached sequences last the run, so no epoch starts (its shuffle reads a CPU permutation)
    trainer = TRAINERS[kind](prior_config(kind, tok, *QUIET, "train.val_every=1000", "train.batch_size=2"),
                             tmp_path / kind)
    short, long = _syncs_over(trainer, count_syncs, 3, 9)
    assert short and len(long) == len(short), long


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_training_steps_do_not_synchronise(tmp_path):
    """torch's sync debug mode raises on any synchronising CUDA call inside the quiet steps."""
    trainer = TokenizerTrainer(small_config("quantizer.name=diveq", "schedule.drift_every=1000", *QUIET),
                               tmp_path / "run")
    trainer.train(max_steps=2)
    batches = trainer._epoch_iter(trainer.state.step)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 6):
            trainer._step(next(batches), step)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_compiled_training_matches_eager_and_saves_plain_weights(tmp_path):
    """train.compile: the same losses as eager (to float tolerance) and checkpoints without the compiled wrapper's
    "_orig_mod." keys, so compiled and eager runs resume each other. The eager run encodes the code cache, the
    compiled one reads it: equal losses also show the cache's creation leaves the initial weights alone."""
    from safetensors.torch import load_file

    tok = tiny_tokenizer_run(tmp_path / "tok")
    losses = {}
    for compiled in (False, True):
        out = tmp_path / f"gpt-{compiled}"
        cfg = prior_config("gpt", tok, "train.max_steps=3", "train.val_fraction=0", f"train.compile={str(compiled).lower()}")
        TRAINERS["gpt"](cfg, out).train()
        losses[compiled] = [r["loss"] for r in map(__import__("json").loads, (out / "metrics.jsonl").read_text().splitlines())]
        keys = list(load_file(next((out / "checkpoints").glob("step-*/model.safetensors"))))
        assert keys and not any("_orig_mod" in k for k in keys)
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
