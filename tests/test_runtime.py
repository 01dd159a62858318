"""Process runtime: intra-op threads from the CPUs the process may use, and --threads on every command."""
import pytest
import torch

from pipelines.cli import main
from stage1_tokenizer import runtime


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
