"""The claims table and the report's grouping of staged runs, on synthetic archived runs."""
import math
import statistics

import pytest

from study.claims import Claims, compare, write_claims
from study.cli import main
from study.report import write_report
from tests.helpers import fake_run


def welch_p(a: list[float], b: list[float]) -> float:
    """Welch's two-sided t-test, computed independently of scipy's from-stats helper."""
    from scipy.stats import ttest_ind

    return float(ttest_ind(a, b, equal_var=False).pvalue)


def cell(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def test_compare_marks_only_significant_differences_and_respects_direction():
    low, high = [10.0, 11.0, 12.0], [20.0, 21.0, 23.0]
    better = compare(cell(low), cell(high), "rfid")  # rFID: lower is better
    assert better["mark"] == "✓" and better["delta"] == pytest.approx(-31 / 3)
    assert better["p"] == pytest.approx(welch_p(low, high))
    assert compare(cell(low), cell(high), "psnr")["mark"] == "✗"  # PSNR: higher is better
    close = compare(cell([10.0, 12.0, 14.0]), cell([11.0, 13.0, 15.0]), "rfid")
    assert close["mark"] == "≈" and close["p"] == pytest.approx(welch_p([10, 12, 14], [11, 13, 15]))
    one_seed = compare(cell([10.0]), cell(high), "rfid")
    assert one_seed["mark"] == "?" and one_seed["p"] is None and one_seed["better"]
    assert compare(None, cell(high), "rfid") is None
    assert math.isclose(compare(cell([1.0, 1.0]), cell([2.0, 2.0]), "rfid")["p"], 0.0)


def test_claims_tables_from_archived_runs(tmp_path):
    runs = []
    for seed, jitter in enumerate((0.0, 1.0, -1.0)):
        runs.append(fake_run(tmp_path, "vq", 512, seed, usage=0.05, rfid=170 + jitter, replaced=0))
        runs.append(fake_run(tmp_path, "simvq", 512, seed, usage=0.7, rfid=150 + jitter))
        runs.append(fake_run(tmp_path, "transvq", 512, seed, usage=0.95, rfid=120 + jitter))
        runs.append(fake_run(tmp_path, "ns-vq", 512, seed, usage=0.3, rfid=150.5 + 3 * jitter, drift=0.4))
        runs.append(fake_run(tmp_path, "diveq", 512, seed, rfid=140 + jitter, psnr=26 + jitter, replaced=12))
        runs.append(fake_run(tmp_path, "sf-diveq", 512, seed, rfid=180 + jitter, usage=0.8))
        runs.append(fake_run(tmp_path, "ns-vq", 512, seed, freeze_at=240, rfid=140 + jitter))
    runs.append(fake_run(tmp_path, "ema", 512, 0, rfid=150.0))
    runs.append(fake_run(tmp_path, "vq", 8192, 0, usage=0.01, rfid=200.0))  # no DiVeQ variant at this K
    claims = Claims(runs)
    text = claims.markdown()
    assert "23 run(s), seeds [0, 1, 2]" in text
    lines = text.splitlines()
    assert not any(line.startswith("| 8192 | rFID |") for line in lines)  # claim 2 has no row without a variant run
    assert any(line.startswith("| 8192 | vq |") for line in lines)  # claim 1 keeps its planned rows
    row = next(line for line in lines if line.startswith("| 512 | transvq |"))
    assert "yes" in row and "✓" in row  # near-full usage; rFID significantly below SimVQ's
    assert "collapsed" in next(line for line in lines if line.startswith("| 512 | vq |"))
    assert "≈" in next(line for line in lines if line.startswith("| 512 | ns-vq |"))
    rfid_row = next(line for line in lines if line.startswith("| 512 | rFID | diveq |")).split("|")
    assert rfid_row[4].strip().startswith("-30.00 ✓")  # vs vq
    assert rfid_row[5].strip().startswith("-10.00 ?")  # vs ema: one run, no test
    assert rfid_row[6].strip() == "-"  # rotation not run
    assert next(line for line in lines if line.startswith("| 512 | rFID | sf-diveq |")).split("|")[4].strip().endswith("✗")
    assert "untested (one run), of which 2 point its way" in text  # diveq vs ema: rFID and PSNR; LPIPS, SSIM equal
    assert "| 512 | diveq | 12 |" in text and "| 512 | vq | 0 |" in text
    assert "| 512 | sf-diveq | 0 (no replacement) |" in text
    staged = next(line for line in lines if line.startswith("| 512 | ns-vq (encoder frozen @240) |"))
    assert "✓" in staged and staged.rstrip(" |").endswith("| 0 | 0.4")  # drift after the freeze vs plain ns-vq
    out = write_claims(runs, tmp_path / "docs" / "claims.md")
    assert out.read_text().startswith(text) and "![rFID against usage](claims.png)" in out.read_text()
    assert (tmp_path / "docs" / "claims.png").stat().st_size > 5000
    assert main(["claims", *map(str, runs), "--output", str(tmp_path / "cli.md")]) == 0
    assert (tmp_path / "cli.md").read_text() == out.read_text().replace("claims.png", "cli.png")


def test_report_keeps_staged_runs_apart_and_links_archived_grids_in_place(tmp_path):
    archive = tmp_path / "study" / "runs"
    runs = [fake_run(archive, "ns-vq", 512, s, rfid=150.0 + s) for s in (0, 1)]
    runs += [fake_run(archive, "ns-vq", 512, s, freeze_at=240, rfid=140.0 + s) for s in (0, 1)]
    for r in runs:
        (r / "eval_recon.png").write_bytes(b"png")
    summary = write_report(runs, tmp_path / "study")
    assert summary["ns-vq"]["rfid"]["mean"] == 150.5 and summary["ns-vq (encoder frozen @240)"]["rfid"]["n"] == 2
    text = (tmp_path / "study" / "report.md").read_text()
    assert "](runs/ns-vq-K512-s0/eval_recon.png)" in text and "s1/eval_recon.png" not in text
    assert not (tmp_path / "study" / "grids").exists(), "grids inside the report folder are linked, not copied"
    elsewhere = write_report(runs, tmp_path / "elsewhere")
    assert elsewhere == summary and (tmp_path / "elsewhere" / "grids" / "ns-vq-K512-s0.png").exists()


def test_near_full_usage_is_judged_against_the_usage_ceiling(tmp_path):
    """82% usage of K = 8,192 on 16k tokens is near-full (ceiling 86%); 82% against a ceiling of 100% is not."""
    ceiling = 1 - math.exp(-16384 / 8192)
    runs = [fake_run(tmp_path, "ns-vq", 8192, s, usage=0.82, usage_ceiling=ceiling) for s in (0, 1)]
    runs += [fake_run(tmp_path, "transvq", 8192, s, usage=0.82, usage_ceiling=1.0) for s in (0, 1)]
    lines = Claims(runs).claim1()
    assert "| yes |" in next(line for line in lines if line.startswith("| 8192 | ns-vq |"))
    assert "| no |" in next(line for line in lines if line.startswith("| 8192 | transvq |"))


def test_usage_plateau_is_the_epoch_usage_slope_over_the_last_epochs(tmp_path):
    """A codebook still gaining 6 points an epoch is flagged in the report and in claim 1; a flat one is not."""
    rising = [0.10, 0.20, 0.40, 0.46, 0.52, 0.58]
    runs = [fake_run(tmp_path, "simvq", 8192, s, usage_epoch=[u + 0.01 * s for u in rising]) for s in (0, 1)]
    runs += [fake_run(tmp_path, "ns-vq", 8192, s, usage_epoch=[0.1, 0.9, 0.98, 0.985, 0.98, 0.983]) for s in (0, 1)]
    summary = write_report(runs, tmp_path / "out")
    assert summary["simvq"]["usage_epoch_slope"]["mean"] == pytest.approx(0.06)  # (0.58 - 0.46) / 2 epochs
    assert summary["ns-vq"]["usage_epoch_slope"]["mean"] == pytest.approx(-0.001)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "still moving when training stopped: simvq rising (+6.0 ± 0.0 points/epoch)" in text
    assert "ns-vq rising" not in text and "ns-vq falling" not in text
    lines = Claims(runs).claim1()
    assert "| rising (+6.0/epoch) |" in next(line for line in lines if line.startswith("| 8192 | simvq |"))
    assert "| plateau (-0.1/epoch) |" in next(line for line in lines if line.startswith("| 8192 | ns-vq |"))
    flat = [fake_run(tmp_path / "flat", "vq", 512, 0, usage_epoch=[0.05] * 4)]
    write_report(flat, tmp_path / "flat-out")
    assert "every variant had plateaued" in (tmp_path / "flat-out" / "report.md").read_text()
    write_report([fake_run(tmp_path / "none", "vq", 512, 0)], tmp_path / "none-out")
    assert "Usage plateau" not in (tmp_path / "none-out" / "report.md").read_text()


# --- does reconstruction predict generation? Spearman over variants with a two-level bootstrap interval -----------
from scipy.stats import spearmanr  # noqa: E402

from study.rank_correlation import spearman_interval  # noqa: E402


def noisy_points(rng, variants: int, seeds: int, slope: float, noise: float) -> dict:
    return {f"v{i}": [(i + rng.normal(0, noise), slope * i + rng.normal(0, noise)) for _ in range(seeds)]
            for i in range(variants)}


def test_rank_correlation_is_spearman_of_the_variant_means():
    import numpy as np

    rng = np.random.default_rng(0)
    points = noisy_points(rng, 8, 3, slope=1.0, noise=2.0)
    means = [[sum(c) / len(c) for c in zip(*pts)] for pts in points.values()]
    ref = spearmanr([m[0] for m in means], [m[1] for m in means])
    res = spearman_interval(points, resamples=500)
    assert res["rho"] == pytest.approx(ref.statistic) and res["p"] == pytest.approx(ref.pvalue)
    assert res["variants"] == 8 and res["runs"] == 24
    assert res["ci"][0] <= res["rho"] <= res["ci"][1]
    from study.rank_correlation import _rho  # the bootstrap's batched rho: scipy's on every row, ties included

    x, y = rng.integers(0, 4, size=(20, 7)), rng.integers(0, 4, size=(20, 7))
    batched = _rho(x.astype(float), y.astype(float))
    for row, (a, b) in enumerate(zip(x, y)):
        ref = spearmanr(a, b).statistic
        assert (math.isnan(batched[row]) and math.isnan(ref)) or batched[row] == pytest.approx(ref)


def test_rank_correlation_interval_is_exact_without_noise_and_shrinks_with_more_variants():
    import numpy as np

    exact = spearman_interval({f"v{i}": [(i, -2.0 * i)] * 3 for i in range(6)}, resamples=300)
    assert exact["rho"] == pytest.approx(-1.0) and exact["ci"] == pytest.approx([-1.0, -1.0])
    rng = np.random.default_rng(1)
    few = spearman_interval(noisy_points(rng, 6, 3, slope=1.0, noise=3.0), resamples=1000)
    many = spearman_interval(noisy_points(rng, 60, 3, slope=1.0, noise=3.0), resamples=1000)
    assert many["ci"][1] - many["ci"][0] < 0.5 * (few["ci"][1] - few["ci"][0])
    unrelated = spearman_interval(noisy_points(rng, 12, 3, slope=0.0, noise=1.0), resamples=1000)
    assert unrelated["ci"][0] < 0 < unrelated["ci"][1]


def test_rank_correlation_needs_three_variants_and_a_ranking():
    assert spearman_interval({"a": [(1, 2)], "b": [(2, 3)]}) is None
    assert spearman_interval({"a": [(1, 2)], "b": [(1, 3)], "c": [(1, 4)]}) is None  # x constant: no ranking
    assert spearman_interval({"a": [(1, 2)], "b": [(2, 3)], "c": [], "d": [(3, 5)]})["variants"] == 3


def test_claims_say_whether_reconstruction_predicts_generation(tmp_path):
    runs = []
    for i, q in enumerate(["vq", "ema", "simvq", "diveq", "sf-diveq", "rotation"]):
        for seed in range(3):  # better rFID and PSNR go with better GPT gFID; usage goes the other way
            runs.append(fake_run(tmp_path, q, 512, seed, rfid=50.0 + 10 * i + seed, psnr=30.0 - i - 0.1 * seed,
                                 usage=0.2 + 0.1 * i + 0.01 * seed, gpt_gfid=60.0 + 10 * i + seed))
    md = Claims(runs).markdown()
    section = md.split("## Does reconstruction or codebook usage predict generation?")[1]
    rows = {line.split(" | ")[2]: line for line in section.splitlines() if line.startswith("| 512 | GPT")}
    assert rows["rFID"].endswith("| yes |") and "+1.00 [+1.00, +1.00]" in rows["rFID"]
    assert rows["PSNR (dB)"].endswith("| yes |") and rows["usage"].endswith("| reversed |")
    assert "| 6 (18) |" in rows["rFID"]
    assert not any(line.startswith("| 512 | LDM") for line in section.splitlines())  # LDM gFID constant: no ranking
