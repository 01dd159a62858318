"""The leaderboard's statistics: Holm's correction, the letter groups, and the table the report puts on top."""
import itertools
import json

import pytest
from scipy import stats

from study.leaderboard import holm, letters, pair_pvalue, pooled_seed_variance, significance
from study.report import write_report
from tests.helpers import fake_run


def results_row(text: str, prior: str, variant: str) -> str:
    """The leaderboard row of ``variant`` under the ``prior`` heading."""
    section = text[text.index(f"### Leaderboard: {prior} prior"):]
    return next(line for line in section.splitlines() if line.startswith("| ") and f"| {variant} |" in line)


def test_holm_matches_the_step_down_definition():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_letters_mark_runs_of_variants_not_significantly_different():
    ranked = ["a", "b", "c", "d"]
    sig = {frozenset(p): False for p in [("a", "b"), ("b", "c"), ("c", "d")]}
    sig.update({frozenset(("a", "c")): True, frozenset(("a", "d")): True, frozenset(("b", "d")): True})
    assert letters(ranked, sig) == {"a": "a", "b": "ab", "c": "bc", "d": "c"}
    assert letters(["x", "y"], {frozenset(("x", "y")): False}) == {"x": "a", "y": "a"}


def test_letters_hold_for_significance_that_is_not_monotone_in_rank():
    """A tight variant differs from the best; a wide one ranked below it does not, so it must share the best's letter
    (a display by consecutive runs gave it the tight one's letter only, claiming a difference the test did not find)."""
    ranked = ["best", "tight", "wide", "worst"]
    sig = {frozenset(p): False for p in itertools.combinations(ranked, 2)}
    sig.update({frozenset(("best", "tight")): True, frozenset(("best", "worst")): True,
                frozenset(("tight", "worst")): True})
    got = letters(ranked, sig)
    assert got == {"best": "a", "tight": "b", "wide": "abc", "worst": "c"}
    for pair, differs in sig.items():  # the display's promise, pair by pair
        u, v = tuple(pair)
        assert bool(set(got[u]) & set(got[v])) is not differs, (u, v)


def test_significance_uses_welch_over_seeds_and_bootstrap_errors_for_single_runs():
    seeds = {"good": {"values": [10.0, 11.0, 10.5], "half_widths": [1, 1, 1]},
             "same": {"values": [10.4, 10.9, 11.1], "half_widths": [1, 1, 1]},
             "bad": {"values": [30.0, 31.0, 29.0], "half_widths": [1, 1, 1]}}
    marks, test = significance(seeds)
    assert "Welch" in test and "Holm" in test
    assert marks["good"] == marks["same"] == "a" and marks["bad"] == "b"
    single = {"good": {"values": [10.0], "half_widths": [1.0]}, "noisy": {"values": [11.0], "half_widths": [5.0]},
              "bad": {"values": [20.0], "half_widths": [1.0]}}
    marks, test = significance(single)
    assert "bootstrap" in test
    assert marks["good"] != marks["bad"] and "a" in marks["good"] and "a" in marks["noisy"]


def test_pooled_seed_variance_is_the_within_group_mean_square_and_gives_students_t():
    a, b = [10.0, 12.0, 11.0], [14.0, 15.5]
    entries = {"a": {"values": a}, "b": {"values": b}, "single": {"values": [9.0]}}
    variance, dof = pooled_seed_variance(entries)
    assert dof == 3
    assert variance == pytest.approx((sum((x - 11.0) ** 2 for x in a) + sum((x - 14.75) ** 2 for x in b)) / 3)
    # with only two variants the pooled test is Student's equal-variance t-test
    p = pair_pvalue({"values": a}, {"values": b}, "pooled", pooled_seed_variance({"a": {"values": a},
                                                                                  "b": {"values": b}}))
    assert p == pytest.approx(stats.ttest_ind(a, b, equal_var=True).pvalue)
    assert pooled_seed_variance({"x": {"values": [1.0]}, "y": {"values": [2.0]}}) is None


def test_mixed_seeds_judge_single_runs_by_the_seed_spread_not_the_bootstrap_alone():
    """A 3-point gap is far outside a bootstrap error of 0.5 but inside a seed spread of several points."""
    entries = {"good": {"values": [10.0], "half_widths": [0.5]}, "next": {"values": [13.0], "half_widths": [0.5]},
               "spread": {"values": [20.0, 24.0, 28.0], "half_widths": [1.0] * 3},
               "bad": {"values": [100.0], "half_widths": [0.5]}}
    marks, test = significance(entries)
    assert "pooled" in test and "bootstrap" not in test
    assert set(marks["good"]) & set(marks["next"])
    assert not set(marks["good"]) & set(marks["bad"])
    only_bootstrap = {k: v for k, v in entries.items() if k != "spread"}
    marks, test = significance(only_bootstrap)
    assert "bootstrap" in test and not set(marks["good"]) & set(marks["next"])


def test_report_puts_a_leaderboard_with_kid_precision_recall_and_groups_on_top(tmp_path):
    runs = []
    for q, base in (("diveq", 40.0), ("vq", 80.0)):
        for seed in (0, 1):
            run = fake_run(tmp_path / "runs", q, 512, seed)
            gen = {kind: {"gfid": base + seed + (5 if kind == "ldm" else 0), "gfid_ci": [base - 2, base + 2],
                          "kid": 0.02 + seed / 1000, "kid_std": 0.001, "precision": 0.7, "recall": 0.5,
                          **({"val_bits_per_token": 3.0 + seed} if kind == "gpt" else {"val_denoising_loss": 0.3})}
                   for kind in ("gpt", "ldm")}
            (run / "generation.json").write_text(json.dumps(gen))
            runs.append(run)
    write_report(runs, tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert text.index("### Leaderboard: GPT prior") < text.index("| quantizer | runs |")
    rows = [line for line in text.splitlines() if line.startswith("| 1 | ") or line.startswith("| 2 | ")]
    assert rows[0].startswith("| 1 | diveq | 512 | 2 |") and "40.5 ± 0.7" in rows[0] and "| a |" in rows[0]
    assert rows[1].startswith("| 2 | vq |") and rows[1].rstrip().endswith("| b |")
    assert "20.50 ± 0.71" in rows[0]  # KID x 1e3
    assert "held-out bits/token" in text and "held-out loss" in text
    assert "| 3.500 ± 0.707 |" in rows[0]  # the GPT's held-out bits per token over the two seeds
    assert results_row(text, "LDM", "diveq").count("0.300") == 1
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["diveq"]["gpt"]["kid"]["mean"] == pytest.approx(0.0205)
    assert results["diveq"]["gpt"]["val_bits_per_token"]["mean"] == pytest.approx(3.5)
    assert results["vq"]["ldm"]["gfid"]["mean"] == pytest.approx(85.5)
