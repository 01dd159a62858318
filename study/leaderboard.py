"""The report's leaderboard: variants ranked by gFID of each prior, with seed spread, estimator noise and which
differences are significant.

Every pair of variants gets the same two-sided test, then Holm's correction over all pairs of a prior:
Welch's t-test on the per-seed gFIDs when every variant has at least two seeds; while some have one seed and others
more, a t-test with the seed variance pooled over the variants that have two or more (one-way ANOVA's within-group
mean square, which holds the estimator noise as well), so the single runs are judged by the spread seeds showed
elsewhere; with no repeated seed at all, a z-test on the gFID difference with each run's bootstrap standard error
(95% interval half-width / 1.96), which covers the estimator noise only. Variants sharing a letter are not
significantly different (alpha 0.05, Holm-adjusted).
"""
from __future__ import annotations

import itertools
import math
import statistics

from scipy import stats

ALPHA = 0.05
Z95 = 1.959963984540054
HELD_OUT = {"gpt": ("val_bits_per_token", "held-out bits/token"), "ldm": ("val_denoising_loss", "held-out loss")}


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the given order."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def _half_width(ci) -> float | None:
    return None if not ci else (ci[1] - ci[0]) / 2


def pooled_seed_variance(entries: dict[str, dict]) -> tuple[float, int] | None:
    """(seed variance pooled over the variants with two or more seeds, its degrees of freedom), or None."""
    repeated = [e["values"] for e in entries.values() if len(e["values"]) >= 2]
    dof = sum(len(v) - 1 for v in repeated)
    if not dof:
        return None
    return sum((len(v) - 1) * statistics.variance(v) for v in repeated) / dof, dof


def pair_pvalue(a: dict, b: dict, test: str, pooled: tuple[float, int] | None = None) -> float:
    """Two-sided p-value of ``a`` vs ``b`` (each ``{"values": [...], "half_widths": [...]}``) by ``test``:
    "welch", "pooled" (with ``pooled`` = (variance, dof)) or "bootstrap"."""
    if test == "welch":
        return float(stats.ttest_ind(a["values"], b["values"], equal_var=False).pvalue)
    diff = statistics.fmean(a["values"]) - statistics.fmean(b["values"])
    if test == "pooled":
        variance, dof = pooled
        t = diff / math.sqrt(variance * (1 / len(a["values"]) + 1 / len(b["values"])))
        return float(2 * stats.t.sf(abs(t), dof))
    se = [statistics.fmean(x["half_widths"]) / Z95 for x in (a, b)]
    z = diff / math.hypot(*se)
    return float(2 * stats.norm.sf(abs(z)))


def letters(ranked: list[str], significant: dict[frozenset, bool]) -> dict[str, str]:
    """Compact letter display (Piepho 2004, insert and absorb) over variants sorted best first: two variants share
    a letter exactly when they are not significantly different, for any pattern of significance (with Welch's
    unequal variances a wide-spread variant can be indistinguishable from the best while a tighter one ranked above
    it differs); letter ``a`` holds the best variant."""
    columns = [frozenset(ranked)]
    for pair, differs in significant.items():
        if not differs:
            continue
        i, j = tuple(pair)
        split = [c for col in columns for c in ((col - {i}, col - {j}) if pair <= col else (col,))]
        columns = [c for c in dict.fromkeys(split) if c and not any(c < other for other in split)]
    rank = {v: n for n, v in enumerate(ranked)}
    columns.sort(key=lambda c: sorted(rank[v] for v in c))
    return {v: "".join(chr(ord("a") + n) if n < 26 else "*" for n, c in enumerate(columns) if v in c) for v in ranked}


def significance(entries: dict[str, dict]) -> tuple[dict[str, str], str]:
    """({variant: letters}, the test used) for ``{variant: {"values", "half_widths"}}`` (lower is better)."""
    ranked = sorted(entries, key=lambda v: statistics.fmean(entries[v]["values"]))
    pooled = pooled_seed_variance(entries)
    if all(len(e["values"]) >= 2 for e in entries.values()):
        test, label = "welch", "Welch's t-test over seeds"
    elif pooled and pooled[0] > 0:
        test = "pooled"
        label = (f"t-test with the seed variance pooled over the variants with two or more seeds (std "
                 f"{math.sqrt(pooled[0]):.2f}, {pooled[1]} dof): not every variant has two seeds")
    else:
        test, label = "bootstrap", "z-test on the bootstrap standard errors, estimator noise only: no seed spread measured"
    usable = test != "bootstrap" or all(e["half_widths"] and None not in e["half_widths"] for e in entries.values())
    if len(ranked) < 2 or not usable:
        return {v: "" for v in ranked}, "none (too few runs or no intervals)"
    pairs = list(itertools.combinations(ranked, 2))
    adjusted = holm([pair_pvalue(entries[a], entries[b], test, pooled) for a, b in pairs])
    significant = {frozenset(p): q < ALPHA for p, q in zip(pairs, adjusted)}
    return letters(ranked, significant), f"{label}, Holm-corrected over {len(pairs)} pairs, alpha {ALPHA}"


def _cell(values: list[float], digits: int = 1) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    mu = statistics.fmean(vals)
    return f"{mu:.{digits}f} ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 else f"{mu:.{digits}f}"


def leaderboard(groups: dict[str, list[dict]], priors: tuple[str, ...]) -> list[str]:
    """Markdown lines: one table per prior, variants ranked by mean gFID, with their group letters."""
    out = []
    for kind in priors:
        entries, rows = {}, {}
        for key, members in groups.items():
            gen = [m["generation"].get(kind) for m in members if m["generation"].get(kind)]
            if not gen:
                continue
            entries[key] = {"values": [g["gfid"] for g in gen],
                            "half_widths": [_half_width(g.get("gfid_ci")) for g in gen]}
            rows[key] = (members, gen)
        if not entries:
            continue
        marks, test = significance(entries)
        held_key, held_title = HELD_OUT.get(kind, ("", "held out"))
        out += [f"### Leaderboard: {kind.upper()} prior", "",
                f"Ranked by gFID (mean ± std over seeds; ±CI: mean half-width of the runs' bootstrap 95% intervals, the "
                f"estimator's noise). Group: variants sharing a letter are not significantly different ({test}).", "",
                "| rank | variant | K | seeds | usage | rFID | LPIPS | PSNR | gFID | ±CI | KID x1e3 | precision | "
                f"recall | {held_title} | group |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        ranked = sorted(entries, key=lambda v: statistics.fmean(entries[v]["values"]))
        for rank, key in enumerate(ranked, 1):
            members, gen = rows[key]
            ev = [m["eval"] for m in members]
            half = [h for h in entries[key]["half_widths"] if h is not None]
            usage = [100 * e["usage"] for e in ev if e.get("usage") is not None]
            out.append(" | ".join([
                f"| {rank}", key.split(" K=")[0], str(members[0]["num_codes"]), str(len(members)),
                _cell(usage) + ("%" if usage else ""), _cell([e.get("rfid") for e in ev]),
                _cell([e.get("lpips_vgg") for e in ev], 3), _cell([e.get("psnr") for e in ev], 2),
                _cell(entries[key]["values"]), f"{statistics.fmean(half):.1f}" if half else "-",
                _cell([1e3 * g["kid"] if g.get("kid") is not None else None for g in gen], 2),
                _cell([g.get("precision") for g in gen], 2), _cell([g.get("recall") for g in gen], 2),
                _cell([g.get(held_key) for g in gen], 3), f"{marks[key] or '-'} |"]))
        out.append("")
    return out


def curve_points(members: list[dict], kind: str) -> dict[float, list[dict]]:
    """{guidance scale: one curve point per seed} of a variant's ``kind`` prior."""
    points: dict[float, list[dict]] = {}
    for m in members:
        for p in (m["generation"].get(kind) or {}).get("curve", []):
            points.setdefault(p["guidance_scale"], []).append(p)
    return dict(sorted(points.items()))


def guidance_curves(groups: dict[str, list[dict]], priors: tuple[str, ...]) -> dict[str, dict]:
    """{prior: {variant: its curve points by scale}} for the variants whose runs scored a guidance curve."""
    out = {}
    for kind in priors:
        curves = {key: curve_points(members, kind) for key, members in groups.items()}
        out[kind] = {key: c for key, c in curves.items() if c}
    return out


def guidance_tables(curves_by_prior: dict[str, dict]) -> list[str]:
    """Markdown lines: per prior (:func:`guidance_curves`), each variant's gFID, KID, precision, recall and class
    consistency at every guidance scale (mean ± std over seeds), its lowest-gFID scale marked."""
    out = []
    for kind, curves in curves_by_prior.items():
        if not curves:
            continue
        out += [f"### Guidance: {kind.upper()} prior (class-conditional, classes sampled in turn)", "",
                "| variant | scale | gFID | ±CI | KID x1e3 | precision | recall | class consistency | |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for key, points in curves.items():
            best = min(points, key=lambda s: statistics.fmean(p["gfid"] for p in points[s]))
            for scale, pts in points.items():
                half = [h for h in (_half_width(p.get("gfid_ci")) for p in pts) if h is not None]
                out.append(" | ".join([
                    f"| {key.split(' K=')[0]}", f"{scale:g}", _cell([p["gfid"] for p in pts]),
                    f"{statistics.fmean(half):.1f}" if half else "-",
                    _cell([1e3 * p["kid"] if p.get("kid") is not None else None for p in pts], 2),
                    _cell([p.get("precision") for p in pts], 2), _cell([p.get("recall") for p in pts], 2),
                    _cell([100 * p["class_consistency"] if p.get("class_consistency") is not None else None
                           for p in pts]) + ("%" if pts[0].get("class_consistency") is not None else ""),
                    ("lowest gFID" if scale == best else "") + " |"]))
        out.append("")
    return out
