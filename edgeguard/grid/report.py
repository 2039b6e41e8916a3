"""The grid's summary rows (mean and std over seeds), the Markdown report and the plots."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from edgeguard.evaluate.report import _table
from edgeguard.fileio import atomic_write
from edgeguard.grid.config import BASELINE, METRICS, AttackPoint, DefensePoint
from edgeguard.stats import paired_comparison, t_interval

# --- summary, report, plots ---------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> dict[str, Any]:
    """Mean, sample std and the 95% t interval of the mean (``lo``/``hi``) over seeds."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "lo": None, "hi": None}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    _, lo, hi = t_interval(values) if n > 1 else (mean, None, None)
    return {"mean": round(mean, 6), "std": None if std is None else round(std, 6), "n": n,
            "lo": None if lo is None else round(lo, 6), "hi": None if hi is None else round(hi, 6)}


ALPHA = 0.05  # significance of the paired comparison against the undefended row
NO_COST = 0.001  # a defender-accuracy drop below this (mean over seeds) counts as no cost


def _paired(row_results: dict[int, dict[str, Any]], base_results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Paired comparison with the undefended row at the seeds both finished (shared victim and attack seeds)."""
    seeds = sorted(set(row_results) & set(base_results))
    out: dict[str, Any] = {"seeds": seeds}
    for key in ("fidelity", "defender_accuracy", "surrogate_accuracy"):
        pairs = [(row_results[s].get(key), base_results[s].get(key)) for s in seeds]
        pairs = [(float(a), float(b)) for a, b in pairs if a is not None and b is not None]
        if len(pairs) < 2:
            out[key] = None
            continue
        c = paired_comparison([a for a, _ in pairs], [b for _, b in pairs])
        out[key] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in c.items()}
    fid, acc = out.get("fidelity"), out.get("defender_accuracy")
    lowers = bool(fid and fid["mean_diff"] < 0 and fid["t_p"] < ALPHA)
    raises = bool(fid and fid["mean_diff"] > 0 and fid["t_p"] < ALPHA)  # the defense helps the attacker
    cost = None if not acc else -acc["mean_diff"]
    out["lowers_fidelity"] = lowers
    out["no_accuracy_cost"] = None if cost is None else cost < NO_COST
    out["verdict"] = ("not enough paired seeds" if fid is None else
                      "lowers fidelity at no accuracy cost" if lowers and out["no_accuracy_cost"] else
                      "lowers fidelity, costs accuracy" if lowers else
                      "raises fidelity (helps the attacker)" if raises else "no significant effect on fidelity")
    return out


def summarize(dpoints: list[DefensePoint], apoints: list[AttackPoint], seeds: tuple[int, ...],
             ids: dict[tuple[int, int, int], str], records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for ai, a in enumerate(apoints):
        block, by_seed = [], []
        for di, d in enumerate(dpoints):
            if not a.meets(d):
                continue
            per_seed = {s: records[ids[di, ai, s]]["result"] for s in seeds if ids[di, ai, s] in records}
            by_seed.append(per_seed)
            results = list(per_seed.values())
            row: dict[str, Any] = {"attack": a.label, "method": a.method, "attack_params": a.params, "defense": d.label,
                                   "defense_name": d.name, "defense_params": d.params, "undefended": d.name == BASELINE,
                                   "seeds": len(results)}
            for key, src, _ in METRICS:
                row[key] = _mean_std([float(r[src]) for r in results if r.get(src) is not None])
            block.append(row)
        base = next(r for r in block if r["undefended"])
        base_seeds = by_seed[block.index(base)]
        for row, per_seed in zip(block, by_seed, strict=True):
            row["paired"] = None if row["undefended"] else _paired(per_seed, base_seeds)
        for row in block:
            row["delta_vs_undefended"] = {
                k: (None if row[k]["mean"] is None or base[k]["mean"] is None else round(row[k]["mean"] - base[k]["mean"], 6))
                for k in ("defender_accuracy", "surrogate_accuracy", "fidelity")}
        rows += block
    return rows


def _fmt(stat: dict[str, Any], digits: int = 4) -> str:
    """``mean [lo, hi]`` (the 95% t interval) when there are several seeds, else the mean."""
    if stat["mean"] is None:
        return "-"
    if digits == 0:
        return f"{stat['mean']:.0f}" + (f" ± {stat['std']:.0f}" if stat["std"] is not None else "")
    if stat.get("lo") is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} [{stat['lo']:.{digits}f}, {stat['hi']:.{digits}f}]"


def _delta(v: float | None) -> str:
    return "-" if v is None else f"{v:+.4f}"


def verdict_table(rows: list[dict[str, Any]]) -> str:
    """Per attack: each defense point against the undefended row at equal seeds -- defender accuracy loss, fidelity
    drop with its 95% interval, the paired t-test and exact sign-flip p-values, and the verdict."""
    out = []
    for attack in dict.fromkeys(r["attack"] for r in rows):
        body = []
        for r in rows:
            if r["attack"] != attack or r["undefended"] or not r.get("paired"):
                continue
            p = r["paired"]
            fid, acc = p.get("fidelity"), p.get("defender_accuracy")
            params = ", ".join(f"{k}={v}" for k, v in r["defense_params"].items()) or "-"
            body.append([
                r["defense_name"], params, len(p["seeds"]),
                "-" if acc is None else f"{0.0 - acc['mean_diff']:+.4f}",  # 0.0 - x: no "-0.0000"
                "-" if fid is None else f"{0.0 - fid['mean_diff']:+.4f} [{0.0 - fid['hi']:+.4f}, {0.0 - fid['lo']:+.4f}]",
                "-" if fid is None else f"{fid['t_p']:.3g}", "-" if fid is None else f"{fid['perm_p']:.3g}",
                "**yes**" if p["lowers_fidelity"] else "no", p["verdict"]])
        if body:
            out += [f"### {attack}", ""]
            out += [_table(["defense", "parameters", "paired seeds", "defender acc loss", "fidelity drop [95% CI]",
                            "paired t p", "sign-flip p", f"significant (p < {ALPHA})", "verdict"], body,
                           "llrrrrrll"), ""]
    return "\n".join(out)


def summary_tables(rows: list[dict[str, Any]]) -> str:
    """One markdown table per attack point (mean ± std over seeds; Δ against the undefended row)."""

    out = []
    for attack in dict.fromkeys(r["attack"] for r in rows):
        block = [r for r in rows if r["attack"] == attack]
        out += [f"### {attack}", ""]
        body = [[r["defense"] + (" (undefended)" if r["undefended"] else ""), r["seeds"],
                 *[_fmt(r[k], 0 if k == "queries_used" else 4) for k, _, _ in METRICS],
                 _delta(r["delta_vs_undefended"]["surrogate_accuracy"]), _delta(r["delta_vs_undefended"]["fidelity"]),
                 _delta(r["delta_vs_undefended"]["defender_accuracy"])] for r in block]
        head = ["defense", "seeds", *[h for _, _, h in METRICS], "Δ surrogate acc", "Δ fidelity", "Δ defender acc"]
        out += [_table(head, body, "lr" + "r" * (len(head) - 2)), ""]
    return "\n".join(out)


def render_markdown(report: dict[str, Any]) -> str:
    v, counts = report["victim"], report["counts"]
    ev = report["eval"]["params"]
    out = [f"# edgeguard grid: {report['name']}", ""]
    out += [
        f"- verdict: **{'PASS' if report['passed'] else 'FAIL'}** ({counts['done']}/{counts['cells']} cells done; "
        f"computed {counts['computed']}, reused {counts['reused']}, failed {counts['failed']})",
        f"- victim: `{v['bundle']}` (sha256 {v['sha256'][:12]}{', trained by this grid' if v.get('trained') else ''})",
        f"- evaluation set: {ev['name']} test split; attack seeds {', '.join(map(str, report['seeds']))}",
        f"- backend {report['backend']}, {report['workers']} workers; total time {report['seconds']['total']:.1f} s "
        f"(victim {report['seconds']['victim']:.1f} s, exports and cells {report['seconds']['tasks']:.1f} s; "
        f"busy time in the workers: exports {report['seconds']['export_busy']:.1f} s, cells {report['seconds']['cell_busy']:.1f} s)",
        "",
        "Surrogate acc: the attacker's model on the test split; fidelity: its top-1 agreement with the defended victim; "
        "defender acc: the victim through its defense on the same split; ε_eff: the defense's mean L1 over the "
        "attacker's queries; Δ: against the undefended row of the same attack.  Mean [95% t interval] over seeds.",
        "",
        "## Verdicts: each defense against no defense, at equal seeds",
        "",
        "Loss and drop are undefended minus defended (positive: the defense lowered it), averaged over the seeds both "
        "rows finished, with the victim and each attack seed shared.  Significant: paired t-test p < 0.05 on "
        "fidelity.  The exact sign-flip test needs no normality but cannot go below 2/2^n (0.0625 with 5 seeds).  "
        f"No accuracy cost: defender accuracy loss below {NO_COST}.",
        "",
        verdict_table(report["summary"]),
        "## Results",
        "",
        summary_tables(report["summary"]),
    ]
    if report["plots"]:
        out += ["## Plots", ""] + [f"![{p['attack']}]({p['path']})" for p in report["plots"]] + [""]
    if report["failures"]:
        out += ["## Failures (retried on a rerun)", ""]
        out += [f"- {f['what']}: {f['error']}" for f in report["failures"]] + [""]
    return "\n".join(out) + "\n"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_.=-]+", "_", text.lower()).strip("_")[:80] or "attack"


def _half(stat: dict[str, Any]) -> float:
    return 0.0 if stat.get("hi") is None else (stat["hi"] - stat["lo"]) / 2


def plot_attack(path: Path, title: str, rows: list[dict[str, Any]]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    rows = [r for r in rows if r["defender_accuracy"]["mean"] is not None]
    base = next((r for r in rows if r["undefended"]), None)
    names = list(dict.fromkeys(r["defense_name"] for r in rows if not r["undefended"]))
    markers = "osD^v<>pPhX"
    for ax, key, ylabel in zip(axes, ("surrogate_accuracy", "fidelity"),
                               ("attacker accuracy (surrogate, test split)", "fidelity (top-1 agreement with the victim)"),
                               strict=True):
        for i, name in enumerate(names):
            pts = [r for r in rows if r["defense_name"] == name and r[key]["mean"] is not None]
            xs = [r["defender_accuracy"]["mean"] for r in pts]
            ys = [r[key]["mean"] for r in pts]
            xe = [_half(r["defender_accuracy"]) for r in pts]  # error bars: the 95% t interval of the mean
            ye = [_half(r[key]) for r in pts]
            ax.errorbar(xs, ys, xerr=xe, yerr=ye, marker=markers[i % len(markers)], linestyle="-" if len(pts) > 1 else "none",
                        capsize=2, label=name, alpha=0.85)
            for r, x, y in zip(pts, xs, ys, strict=True):
                if r["defense_params"]:
                    ax.annotate(",".join(f"{k}={v}" for k, v in r["defense_params"].items()), (x, y), fontsize=7,
                                xytext=(4, 4), textcoords="offset points")
        if base is not None and base[key]["mean"] is not None:
            ax.scatter([base["defender_accuracy"]["mean"]], [base[key]["mean"]], marker="*", s=320, facecolors="none",
                       edgecolors="black", linewidths=1.6, zorder=5, label="undefended")  # hollow: points under it show
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo, min(hi, 1.01))  # accuracies: no room past 1
        ax.set_xlabel("defender accuracy (victim through its defense)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
