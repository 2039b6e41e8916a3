"""Pipeline reports: ``report.json`` (everything, machine-readable) and ``report.md`` (for people)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeguard.fileio import atomic_write_bytes, atomic_write_json


def _table(head: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    align = align or "l" * len(head)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _num(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def render_markdown(report: dict[str, Any]) -> str:
    res = report["results"]
    cfg = report["config"]["params"]
    out = [f"# edgeguard pipeline report: {report['name']}", ""]
    verdict = "PASS" if report["passed"] else "FAIL"
    out += [
        f"- verdict: **{verdict}** ({sum(c['passed'] for c in report['checks'])}/{len(report['checks'])} checks passed)",
        f"- edgeguard {report['edgeguard_version']}, "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- seed {cfg['seed']}; total time {report['seconds']['total']:.1f} s "
        + "(" + ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items() if k != "total") + ")",
        "",
    ]
    for key, section in _sections():  # in report order
        if key in res:
            out += section(res)
    out += ["## Artifacts", ""]
    out += [_table(["name", "path"], [[k, f"`{v}`"] for k, v in report["artifacts"].items()]), ""]
    out += ["## Checks", ""]
    out += [f"- {'PASS' if c['passed'] else 'FAIL'} {c['name']}: {c['detail']}" for c in report["checks"]]
    return "\n".join(out) + "\n"


def _sections():
    return (("train", _train_section), ("import", _import_section), ("evaluate", _accuracy_section),
            ("watermark", _watermark_section), ("magicguard", lambda r: _magicguard_section(r["magicguard"])),
            ("fragile", lambda r: _fragile_section(r["fragile"])), ("defenses", _defenses_section),
            ("extraction", _extraction_section), ("bench", _bench_section), ("serve", _serve_section))


def _train_section(res: dict[str, Any]) -> list[str]:
    out: list[str] = []
    t = res["train"]
    last = t["history"][-1] if t["history"] else {}
    out += ["## Training", ""]
    out += [
        _table(
            ["arch", "dataset", "parameters", "epochs", "steps", "seconds", "final loss", "final train acc"],
            [[t["arch"], t["dataset"], f"{t['parameters']:,}", t["epochs"], t["steps"], f"{t['seconds']:.1f}",
              f"{last.get('loss', float('nan')):.4f}", f"{last.get('train_accuracy', float('nan')):.4f}"]],
            "llrrrrrr",
        ),
        "",
    ]
    return out


def _import_section(res: dict[str, Any]) -> list[str]:
    out: list[str] = []
    t = res["import"]
    out += ["## Imported model", ""]
    out += [
        _table(
            ["source", "kind", "parameters", "input", "classes", "head", "outputs", "mean", "std"],
            [[t["source"], t["kind"], f"{t['parameters']:,}", "x".join(map(str, t["input_shape"])), len(t["classes"]),
              t["head"], t["outputs"], ", ".join(f"{v:g}" for v in t["mean"]), ", ".join(f"{v:g}" for v in t["std"])]],
            "llrlrllll",
        ),
        "",
    ]
    if t.get("weights"):
        out += [f"Weights: {t['weights']}", ""]
    return out


def _accuracy_section(res: dict[str, Any]) -> list[str]:
    out: list[str] = []
    acc = res["evaluate"]["accuracy"]
    any_acc = next(iter(acc.values()))
    out += [f"## Accuracy ({any_acc['dataset']} {any_acc['split']} split, n={any_acc['n']})", ""]
    rows = []
    for name, a in acc.items():
        art = a["artifact"]
        size = f"{a['bytes'] / 1e6:.2f} MB" if "bytes" in a else "?"
        rows.append([name, art["backend"], art["precision"], art["defense"], f"{a['accuracy']:.4f}",
                     f"{a['correct']}/{a['n']}", size, art["sha256"][:12]])
    out += [_table(["artifact", "backend", "precision", "defense", "accuracy", "correct", "size", "sha256"], rows, "llllrrrl"), ""]
    if res["evaluate"]["parity"]:
        out += ["## Agreement with the PyTorch bundle (same inputs, whole split; gated for FP32 artifacts only)", ""]
        rows = [[name, f"{p['max_abs_diff']:.2e}", f"{p['mean_abs_diff']:.2e}", f"{p['top1_agreement']:.4f}",
                 f"{p['atol']:g}", ("pass" if p["passed"] else "FAIL") if acc[name]["artifact"]["precision"] == "fp32" else "INT8: see accuracy"]
                for name, p in res["evaluate"]["parity"].items()]
        out += [_table(["artifact", "max abs Δprob", "mean abs Δprob", "top-1 agreement", "tolerance", "verdict"], rows, "lrrrrl"), ""]
    return out


def _watermark_section(res: dict[str, Any]) -> list[str]:
    out: list[str] = []
    out += ["## Watermark (Adi et al. backdoor) on the ONNX artifacts", ""]
    a = res["watermark"]["attack"]["params"]
    if a["modes"]:
        out += [f"Removal attacks: {a['epochs']} epochs of SGD at lr {a['lr']:g} on {a['data_fraction']:.0%} of the "
                 "owner's training data, ground-truth labels, no triggers; each attacked model is exported and "
                 "checked as an outside verifier would (the owner's last layer is never put back)."
                 + (" They target the watermarked bundle before MagicGuard; fine-tuning the guarded bundle is in "
                    "the MagicGuard section." if "magicguard" in res else ""), ""]
    rows = [[r["model"], f"{r['clean_accuracy']:.4f}", f"{r['matches']}/{r['n']}", f"{r['trigger_accuracy']:.2f}",
             f"{r['p_value']:.2e}", r["m_star"], r["verdict"]] for r in res["watermark"]["rows"]]
    out += [_table(["model", "clean accuracy", "trigger matches", "trigger accuracy", "p-value", "threshold m*", "verdict"],
                   rows, "lrrrrrl"), ""]
    return out


def _defenses_section(res: dict[str, Any]) -> list[str]:
    out: list[str] = []
    d = res["defenses"]
    ood = d["ood"]["params"]
    out += ["## Output defenses against model extraction (each artifact against its own undefended view)", ""]
    out += [f"Accuracy and argmax agreement on the {res.get('evaluate', {}).get('accuracy', {}).get('bundle', {}).get('split', 'test')} "
            f"split; L1 = |defended - undefended| summed over classes, mean (max) per query; OOD = {ood['name']} "
            f"{ood['options']}; latency ratio = defended p50 / undefended p50 in the same run.", ""]
    rows = []
    for r in d["rows"]:
        rows.append([r["defense"], r["precision"], "graph" if r["fusable"] else "host",
                     f"{r['accuracy']:.4f}", f"{r['agreement']:.4f}", f"{r['l1_mean']:.4f} ({r['l1_max']:.3f})",
                     f"{r['ood_l1_mean']:.4f}" if r["ood_l1_mean"] is not None else "-",
                     f"{r['ood_agreement']:.4f}" if r["ood_agreement"] is not None else "-",
                     _num(r.get("latency_ratio_b1")), _num(r.get("latency_ratio_b64"))])
    out += [_table(["defense", "model", "runs in", "accuracy", "argmax agreement", "L1 test", "L1 OOD", "OOD agreement",
                    "latency x (b1)", "latency x (b64)"], rows, "lllrrrrrrr"), ""]
    return out


def _extraction_section(res: dict[str, Any]) -> list[str]:
    out: list[str] = []
    x = res["extraction"]
    p = x["config"]["params"]
    out += [f"## Model extraction ({x['method']}) against the shipped FP32 model", ""]
    out += [f"Budget {p['budget']} queries from `{p['query_set']}`, surrogate {p['surrogate']} trained {p['epochs']} epochs; "
            "accuracy and fidelity (top-1 agreement with the defended victim) on the test split.", ""]
    rows = [[r["defense"], r["queries_used"], f"{r['surrogate_accuracy']:.4f}", f"{r['fidelity']:.4f}",
             f"{r['defender_accuracy']:.4f}", _num(r["defense_l1_mean"], ".4f")] for r in x["rows"]]
    out += [_table(["defense", "queries", "surrogate accuracy", "fidelity", "defender accuracy", "defense L1 (attacker queries)"],
                   rows, "lrrrrr"), ""]
    return out


def _bench_section(res: dict[str, Any]) -> list[str]:
    out: list[str] = []
    b = res["bench"]
    m = b["machine"]
    out += [f"## Latency ({m['processor']}, {m['cpus']} CPUs; warm-up excluded; speed-up relative to the first row)", ""]
    rows = [[r["artifact"], r["backend"], r["batch"], f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['throughput']:.0f}",
             f"{r['ratio_p50']:.2f}x"] for r in b["rows"]]
    out += [_table(["artifact", "backend", "batch", "p50 ms", "p90 ms", "img/s", "speed-up"], rows, "llrrrrr"), ""]
    return out


def _serve_section(res: dict[str, Any]) -> list[str]:
    out: list[str] = []
    sv = res["serve"]
    out += [f"## Served by Triton Inference Server ({sv['protocol']}, `{sv['url']}`): the same checks as on the file", ""]
    rows = []
    if "watermark_file" in sv:
        for where in ("file", "server"):
            w = sv[f"watermark_{where}"]
            rows.append([f"watermark ({where})", f"{w['verdict']}: {w['matches']}/{w['n']}, p-value {w['p_value']:.3g}"])
    for where in ("file", "server"):
        k = sv[f"knockoff_{where}"]
        srv = k.get("server") or {}
        counted = f", Triton counted {srv['inference_rows']} rows" if srv.get("inference_rows") is not None else ""
        rows.append([f"KnockoffNets ({where})", f"{k['queries_used']}/{k['budget']} queries{counted}; fidelity "
                     f"{k['fidelity']:.4f}, surrogate accuracy {k['surrogate_accuracy']:.4f}"])
    rows.append(["SIGTERM to exit", f"{sv['stop_seconds']:.2f} s"])
    out += [_table(["check", "result"], rows), ""]
    return out


def _magicguard_section(mg: dict[str, Any]) -> list[str]:
    p, d = mg["protect"], mg["destruction"]
    c = p["config"]
    out = ["## MagicGuard (self-destruction under fine-tuning)", ""]
    out += [f"Guard `{c['variant']}` at `{c['site']}`, a = {c['a']:g}, w = {c['w']:g} (a·w = {c['a'] * c['w']:g}), "
            f"{c['ratio']:.0%} of the units. Inserting it moved the logits by at most {p['max_abs_change']:.4f}; test "
            f"accuracy {p['accuracy_before']:.4f} -> {p['accuracy_after']:.4f}, top-1 agreement {p['top1_agreement']:.4f}"
            + (f", trigger accuracy {p['trigger_accuracy_before']:.3f} -> {p['trigger_accuracy_after']:.3f}"
               if p.get("trigger_accuracy_before") is not None else "") + ".", ""]
    if mg.get("fidelity"):
        out += [_table(["form", "unguarded accuracy", "guarded accuracy", "guard nodes pinned FP32"],
                       [[r["form"], f"{r['unguarded']:.4f}", f"{r['guarded']:.4f}", len(r["fp32_nodes"])] for r in mg["fidelity"]],
                       "lrrr"), ""]
    cfg = d["config"]["params"]
    out += [f"The attacker fine-tunes every layer on the owner's full training set (batch {cfg['batch_size']}, augment "
            f"{cfg['augment']}) for {cfg['steps']} steps; test accuracy (%) at each step, the guarded bundle against the same "
            "weights with the guard stripped. Trigger = watermark trigger accuracy at the end. A run whose loss stopped "
            "being finite keeps its wreck's accuracy from that step on.", ""]
    runs = d["runs"]
    steps = [q["step"] for q in runs[0]["points"]]
    rows = []
    for r in runs:
        trig = r["points"][-1].get("trigger_accuracy")
        rows.append([r["recipe"], r["model"] + (f" (diverged at {r['diverged_at']})" if r["diverged_at"] is not None else ""),
                     r["seed"], *[f"{q['accuracy'] * 100:.1f}" for q in r["points"]], "-" if trig is None else f"{trig * 100:.0f}"])
    out += [_table(["recipe", "model", "seed", *[f"step {s}" for s in steps], "trigger"], rows,
                   "lll" + "r" * (len(steps) + 1)), ""]
    if mg.get("plot"):
        out += [f"![accuracy vs fine-tuning steps]({mg['plot']})", ""]
    out += ["Where the guard does not destroy (Adam at small learning rates, in particular) the table says so; an informed "
            "attacker who deletes the visible `Sin` node fine-tunes the stripped model like the unguarded row.", ""]
    return out


def _fragile_section(fr: dict[str, Any]) -> list[str]:
    e = fr["enrol"]
    g = e["generation"]
    out = ["## Fragile triggers (Yin et al.: is this exactly the model we shipped?)", ""]
    out += [f"{e['n']} triggers generated against {e['surrogate']} in {g['steps']} generator steps (a = {g['a']:.4g}; mean "
            f"top-1 probability {g['mean_top1_probability']:.3f}, log-probability margin min {g['margin_min']:.3f} / median "
            f"{g['margin_median']:.3f}), then enrolled on the artifact: {e['kept']}/{e['n']} kept (stable over repeated "
            f"runs at batch sizes 1 and {e['n']}, margin >= {e['margin_floor']:.2g}; noise {e['noise']:.1e}). The model "
            "itself is not changed. Verdict: intact iff every enrolled trigger keeps its label and every log-probability "
            "stays within the enrolled tolerance; a changed file hash is reported as modified; another backend or "
            "precision is drift, not tampering.", ""]
    if fr.get("guarded"):
        out += ["The shipped model is MagicGuard-protected, so the fine-tuning row also sets off its self-destruction; "
                "the weight-noise row is a small edit without it.", ""]
    rows = [[r["artifact"], r["verdict"], f"{r['acc_tri']:.3f}", f"{r['flipped']}/{r['kept']}", f"{r['max_deviation']:.2g}",
             "yes" if r["hash_matches"] else "no", _num(r.get("test_accuracy"), ".4f")] for r in fr["rows"]]
    out += [_table(["artifact", "verdict", "AccTri", "flipped", "max |Δlog p|", "same file", "test accuracy"], rows,
                   "llrrrll"), ""]
    if isinstance(fr.get("int8_enrol"), dict) and "error" in fr["int8_enrol"]:
        out += [f"INT8 enrolment of the same triggers failed: {fr['int8_enrol']['error']}", ""]
    return out


def write_report(out_dir: str | Path, report: dict[str, Any]) -> None:
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_bytes(out_dir / "report.md", render_markdown(report).encode())
