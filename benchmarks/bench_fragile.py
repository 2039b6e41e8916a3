"""Fragile-trigger benchmark: sensitivity to fine-tuning (paper Fig. 2 / Table 4 in spirit) and the deployed path.

1. Sensitivity, on digits (1x32x32, real handwritten digits) and on ``synthetic`` (3x32x32 procedural gratings, the
   second embedded dataset): one trigger set per generator (untrained, CE only, CE + a·Var) against a small CNN, then
   20 seeded fine-tuning trials per regime (classifier only / all layers; SGD lr 1e-3, momentum 0.9, batch 128, on the
   training set plus 10% BIM "backdoor" samples relabelled to 0), AccTri after every epoch.
2. Deployed path, on digits: triggers generated against and enrolled on the FP32 ONNX and on the INT8 QDQ ONNX
   (generated against its fake-quant copy), 20 re-verifications each (false alarms), the drift of the FP32 triggers
   on the INT8 artifact, and one epoch of last-layer fine-tuning -> re-export -> verify (tamper detection).

    python benchmarks/bench_fragile.py                  # 2 datasets x 3 generators x 20 seeds x 5 epochs (~25 min)
    python benchmarks/bench_fragile.py --seeds 5 --epochs 2 --datasets digits   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_runtimes  # noqa: E402  (machine info)

from edgeguard.api import export_bundle, train_bundle  # noqa: E402
from edgeguard.attacks import FinetuneConfig, finetune_attack  # noqa: E402
from edgeguard.config import DataConfig, ModelConfig  # noqa: E402
from edgeguard.data import load_data  # noqa: E402
from edgeguard.evaluate import evaluate_accuracy  # noqa: E402
from edgeguard.evaluate.sensitivity import SensitivityConfig, plot_sensitivity, run_sensitivity  # noqa: E402
from edgeguard.protect.fragile import FragileStore, protect_fragile, verify_store  # noqa: E402
from edgeguard.quantize import PtqConfig, quantize_bundle  # noqa: E402
from edgeguard.runtime import open_runner  # noqa: E402
from edgeguard.training import TrainConfig  # noqa: E402

DATASETS = {"digits": DataConfig("digits"), "synthetic": DataConfig("synthetic")}


def deployed(base: str, work: Path) -> dict:
    """Enrol FP32 and INT8 ONNX artifacts, re-verify 20 times each, measure drift and detect one fine-tuning epoch."""
    test = load_data(DataConfig("digits"), "test")
    fp32 = export_bundle(base, work / "fp32.onnx").path
    int8 = export_bundle(quantize_bundle(base, work / "int8", PtqConfig(target="cpu")).bundle, work / "int8.onnx").path
    out: dict = {"artifacts": {}}
    for name, path in (("fp32", fp32), ("int8", int8)):
        with open_runner(path) as r:
            acc_before = evaluate_accuracy(r, test).accuracy
        t = time.perf_counter()
        res = protect_fragile(path, work / f"vault_{name}" / "fragile")
        seconds = round(time.perf_counter() - t, 1)
        store = FragileStore(work / f"vault_{name}" / "fragile")
        with open_runner(path) as r:
            verdicts = [verify_store(r, store).verdict for _ in range(20)]
            acc_after = evaluate_accuracy(r, test).accuracy
        out["artifacts"][name] = {"kept": res.kept, "n": res.n, "key_agreement": res.key_agreement, "noise": res.noise,
                                  "margin_min": res.margin_min, "generation_seconds": seconds,
                                  "mean_top1_probability": res.generation["mean_top1_probability"],
                                  "intact_of_20": verdicts.count("intact"),
                                  "accuracy_before": acc_before, "accuracy_after": acc_after}
    with open_runner(int8) as r:
        drift = verify_store(r, FragileStore(work / "vault_fp32" / "fragile"))
    out["drift_fp32_triggers_on_int8"] = {"verdict": drift.verdict, "flip_rate": round(1 - drift.acc_tri, 4)}
    rows = []
    for seed in range(5):
        ft = finetune_attack(base, work / f"ft{seed}", FinetuneConfig(mode="ftll", epochs=1, lr=1e-3, seed=seed))
        path = export_bundle(ft.bundle, work / f"ft{seed}.onnx").path
        with open_runner(path) as r:
            v = verify_store(r, FragileStore(work / "vault_fp32" / "fragile"))
        rows.append({"seed": seed, "verdict": v.verdict, "acc_tri": v.acc_tri, "flipped": len(v.flipped),
                     "max_deviation": round(v.max_deviation, 4)})
    out["ftll_1_epoch_fp32_onnx"] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--seeds", type=int, default=20, help="fine-tuning trials per regime")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--no-deployed", action="store_true", help="skip the ONNX / INT8 enrolment part")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "fragile.json")
    args = ap.parse_args()
    os.environ.setdefault("EDGEGUARD_QUIET", "1")
    t0 = time.perf_counter()
    report: dict = {"machine": bench_runtimes.machine(), "sensitivity": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for ds in args.datasets:
            base = train_bundle(DATASETS[ds], ModelConfig("smallcnn"), TrainConfig(epochs=10, lr=0.05, seed=0), work / ds)
            with open_runner(base.bundle) as r:
                acc = evaluate_accuracy(r, load_data(DATASETS[ds], "test")).accuracy
            s = run_sensitivity(base.bundle, SensitivityConfig(seeds=tuple(range(args.seeds)), epochs=args.epochs), quiet=False)
            plot = plot_sensitivity(s, args.out.with_name(f"fragile_{ds}.png"))
            report["sensitivity"][ds] = {"test_accuracy": acc, **s.to_json(), "plot": str(plot) if plot else None}
            print(f"## {ds}: small CNN, test accuracy {acc:.4f}\n")
            print("| generator | steps | a | mean top-1 probability | classes with p >= 0.1 | margin min / median |")
            print("|---|---:|---:|---:|---:|---:|")
            for v, k in s.keys.items():
                print(f"| {v} | {k['steps']} | {k['a']:.4g} | {k['mean_top1_probability']:.3f} | "
                      f"{k['mean_classes_above_0_1']:.2f} | {k['margin_min']:.3f} / {k['margin_median']:.3f} |")
            print()
            print(s.table())
            print()
            _write(args.out, report, t0)
            if ds == "digits" and not args.no_deployed:
                report["deployed"] = d = deployed(base.bundle, work)
                print("## Deployed artifacts (digits)\n")
                print("| artifact | kept | agreement with key | noise | margin min | intact / 20 | generation s | accuracy before = after |")
                print("|---|---:|---:|---:|---:|---:|---:|---|")
                for name, a in d["artifacts"].items():
                    print(f"| {name} ONNX | {a['kept']}/{a['n']} | {a['key_agreement']:.2f} | {a['noise']:.1e} | "
                          f"{a['margin_min']:.3f} | {a['intact_of_20']} | {a['generation_seconds']} | "
                          f"{a['accuracy_before']:.4f} = {a['accuracy_after']:.4f} |")
                dr = d["drift_fp32_triggers_on_int8"]
                print(f"\nFP32 triggers on the INT8 artifact: {dr['verdict']}, flip rate {dr['flip_rate']:.2f}\n")
                print("| FTLL 1 epoch, seed | verdict | AccTri | flipped | max |Δlog p| |\n|---|---|---:|---:|---:|")
                for r in d["ftll_1_epoch_fp32_onnx"]:
                    print(f"| {r['seed']} | {r['verdict']} | {r['acc_tri']:.2f} | {r['flipped']} | {r['max_deviation']} |")
                print()
                _write(args.out, report, t0)
    _write(args.out, report, t0)
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")


def _write(path: Path, report: dict, t0: float) -> None:
    report["seconds"] = round(time.perf_counter() - t0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
