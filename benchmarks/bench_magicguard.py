"""MagicGuard destruction benchmark: clean and trigger accuracy over fine-tuning steps, guarded vs unguarded.

Trains the digits small CNN (seeded, as the demo), embeds the backdoor watermark (100 generated triggers), inserts
MagicGuard with ``protect_magicguard`` and runs ``run_destruction``: the attacker holds the owner's full training
set and fine-tunes all layers with each recipe (SGD momentum 0.9 at several learning rates, Adam at two) and seed,
on the guarded bundle and on the same weights with the guard stripped.  Also measures the guard's fidelity on the
bundle, the FP32 ONNX and the INT8 ONNX (PTQ, guarded vs unguarded).  Prints Markdown tables and writes JSON and a
plot.

    python benchmarks/bench_magicguard.py                       # 4 recipes x 3 seeds x 300 steps (~12 min, 2 cores)
    python benchmarks/bench_magicguard.py --seeds 0 --steps 200 # quicker
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
from edgeguard.config import DataConfig, ModelConfig  # noqa: E402
from edgeguard.data import load_data  # noqa: E402
from edgeguard.evaluate import evaluate_accuracy  # noqa: E402
from edgeguard.evaluate.destruction import DestructionConfig, Recipe, plot_destruction, run_destruction  # noqa: E402
from edgeguard.protect import WatermarkConfig, embed_watermark  # noqa: E402
from edgeguard.protect.magicguard import MagicGuardConfig, protect_magicguard  # noqa: E402
from edgeguard.quantize import PtqConfig, quantize_bundle  # noqa: E402
from edgeguard.runtime import open_runner  # noqa: E402
from edgeguard.training import TrainConfig  # noqa: E402

RECIPES = (Recipe("sgd", 1e-3), Recipe("sgd", 1e-2), Recipe("adam", 1e-4), Recipe("adam", 1e-3))


def fidelity(marked: str, guarded: str, work: Path) -> list[dict]:
    """Test accuracy guarded vs unguarded as bundle, FP32 ONNX and INT8 ONNX (PTQ, cpu target)."""
    test = load_data(DataConfig("digits"), "test")
    rows = []
    forms = {}
    for name, b in (("unguarded", marked), ("guarded", guarded)):
        q = quantize_bundle(b, work / f"{name}_int8", PtqConfig(target="cpu", calib_samples=512)).bundle
        forms[name] = {"bundle": b, "FP32 ONNX": export_bundle(b, work / f"{name}.onnx").path,
                       "INT8 ONNX": export_bundle(q, work / f"{name}_int8.onnx").path}
    for form in ("bundle", "FP32 ONNX", "INT8 ONNX"):
        accs = {}
        for name in ("unguarded", "guarded"):
            with open_runner(forms[name][form]) as r:
                accs[name] = evaluate_accuracy(r, test).accuracy
        rows.append({"form": form, **accs, "change_points": round((accs["guarded"] - accs["unguarded"]) * 100, 3)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "magicguard.json")
    args = ap.parse_args()
    os.environ.setdefault("EDGEGUARD_QUIET", "1")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = train_bundle(DataConfig("digits"), ModelConfig("smallcnn"), TrainConfig(epochs=10, lr=0.05, seed=0),
                            work / "base").bundle
        marked = embed_watermark(base, work / "marked", WatermarkConfig(epochs=20), key_seed=1234).bundle
        prot = protect_magicguard(marked, work / "guarded", MagicGuardConfig())
        fid = fidelity(marked, prot.bundle, work)
        d = run_destruction(prot.bundle, DestructionConfig(recipes=RECIPES, steps=args.steps, eval_every=args.eval_every,
                                                           seeds=tuple(args.seeds)))
    plot = plot_destruction(d, args.out.with_suffix(".png"))
    print("## Fidelity (digits test, n=540; a = 0.01, w = 1e4 at the logits)\n")
    print("| form | unguarded | guarded | change (points) |\n|---|---:|---:|---:|")
    for r in fid:
        print(f"| {r['form']} | {r['unguarded']:.4f} | {r['guarded']:.4f} | {r['change_points']:+.2f} |")
    print(f"\nmax |Δlogit| at insertion {prot.max_abs_change:.4f}; trigger accuracy {prot.trigger_accuracy_before:.2f} -> "
          f"{prot.trigger_accuracy_after:.2f}\n")
    print("## Fine-tuning (test accuracy %, per checkpoint; trigger accuracy % at the end)\n")
    print(d.table())
    print("\n## Summary over seeds\n")
    print("| recipe | model | seeds at <= 2x chance | final accuracy (min-max) | final trigger accuracy (max) |")
    print("|---|---|---:|---:|---:|")
    for s in d.summary():
        print(f"| {s['recipe']} | {s['model']} | {s['destroyed']}/{s['seeds']} | {s['final_min']:.3f}-{s['final_max']:.3f} "
              f"| {s.get('trigger_final_max', float('nan')):.2f} |")
    report = {"machine": bench_runtimes.machine(), "seconds": round(time.perf_counter() - t0, 1),
              "protect": prot.to_json(), "fidelity": fid, "destruction": d.to_json(),
              "plot": str(plot) if plot else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
