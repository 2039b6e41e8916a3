"""What an output defense costs and changes, measured on the deployed artifact against its own undefended view.

For a defended artifact (fused head or host-side), ``measure_defense`` compares the Runner clients get with the
same artifact's undefended output (``open_runner(path, undefended=True)``: the graph cut at its logits):
defender top-1 accuracy, argmax agreement with the undefended model, mean and max L1 distance between the
defended and clean probability vectors on the test split and on an out-of-distribution query set, rows the
defense flagged (ModelGuard-S codebook misses), and latency against the undefended view at each batch size,
timed in the same run (alternating blocks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgeguard.data import ImageDataset
from edgeguard.errors import BadInput
from edgeguard.evaluate.bench import BenchConfig, bench_runners
from edgeguard.evaluate.metrics import check_compatible
from edgeguard.runtime import Runner


@dataclass(frozen=True)
class QuerySetStats:
    name: str
    n: int
    agreement: float  # argmax(defended) == argmax(undefended)
    l1_mean: float
    l1_max: float
    accuracy: float | None = None  # defended top-1 (labelled sets only)
    clean_accuracy: float | None = None
    flagged: int = 0


@dataclass(frozen=True)
class DefenseMeasurement:
    artifact: str
    defense: str
    placement: str
    params: dict[str, Any]
    test: QuerySetStats
    ood: QuerySetStats | None
    latency: list[dict[str, Any]] = field(default_factory=list)  # per batch: clean/defended p50 and their ratio
    passed: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def row(self) -> dict[str, Any]:
        """One line of the report's defense table."""
        ratios = {f"latency_ratio_b{r['batch']}": r["ratio"] for r in self.latency}
        return {"defense": self.defense, "placement": self.placement, "accuracy": self.test.accuracy,
                "clean_accuracy": self.test.clean_accuracy, "agreement": self.test.agreement,
                "l1_mean": self.test.l1_mean, "l1_max": self.test.l1_max,
                "ood_l1_mean": self.ood.l1_mean if self.ood else None,
                "ood_agreement": self.ood.agreement if self.ood else None, **ratios}

    def summary(self) -> str:
        t = self.test
        lines = [f"defense {self.defense} ({self.placement}) on {self.artifact}",
                 f"  {t.name}: accuracy {t.accuracy:.4f} (undefended {t.clean_accuracy:.4f}), argmax agreement "
                 f"{t.agreement:.4f}, L1 mean {t.l1_mean:.4f} max {t.l1_max:.4f} over {t.n} images"
                 + (f", {t.flagged} flagged" if t.flagged else "")]
        if self.ood:
            o = self.ood
            lines.append(f"  {o.name} (out of distribution): argmax agreement {o.agreement:.4f}, L1 mean {o.l1_mean:.4f} "
                         f"max {o.l1_max:.4f} over {o.n} images" + (f", {o.flagged} flagged" if o.flagged else ""))
        for r in self.latency:
            ratio = f"x{r['ratio']:.3f}" if r["ratio"] is not None else "ratio n/a"
            lines.append(f"  batch {r['batch']}: p50 {r['defended_ms']:.3f} ms defended vs {r['clean_ms']:.3f} ms undefended "
                         f"({ratio})")
        return "\n".join(lines)


def _compare(defended: Runner, clean: Runner, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    before = defended.flagged
    q = np.concatenate([defended.predict(x[s : s + batch_size]) for s in range(0, len(x), batch_size)]) if len(x) else \
        np.zeros((0, defended.info.num_classes), np.float32)
    p = np.concatenate([clean.predict(x[s : s + batch_size]) for s in range(0, len(x), batch_size)]) if len(x) else q
    return q, p, defended.flagged - before


def query_set_stats(name: str, q: np.ndarray, p: np.ndarray, labels: np.ndarray | None = None, flagged: int = 0) -> QuerySetStats:
    l1 = np.abs(q.astype(np.float64) - p.astype(np.float64)).sum(1)
    acc = clean_acc = None
    if labels is not None and len(labels):
        acc = round(float((q.argmax(1) == labels).mean()), 6)
        clean_acc = round(float((p.argmax(1) == labels).mean()), 6)
    return QuerySetStats(name=name, n=len(q), agreement=round(float((q.argmax(1) == p.argmax(1)).mean()) if len(q) else 0.0, 6),
                         l1_mean=round(float(l1.mean()) if len(l1) else 0.0, 6), l1_max=round(float(l1.max()) if len(l1) else 0.0, 6),
                         accuracy=acc, clean_accuracy=clean_acc, flagged=flagged)


def measure_defense(
    defended: Runner,
    clean: Runner,
    test: ImageDataset,
    ood: ImageDataset | None = None,
    *,
    bench: BenchConfig | None = None,
    batch_size: int = 256,
    params: dict[str, Any] | None = None,
    placement: str = "graph",
) -> DefenseMeasurement:
    check_compatible(defended, test)
    x, y = test.tensors()
    q, p, flagged = _compare(defended, clean, x.numpy(), batch_size)
    test_stats = query_set_stats(f"{test.info.name}/{test.split}", q, p, y.numpy(), flagged)
    ood_stats = None
    if ood is not None:
        xo, _ = ood.tensors()
        if tuple(xo.shape[1:]) != tuple(d for d in defended.info.input_shape):
            raise BadInput(f"the out-of-distribution set has images {tuple(xo.shape[1:])}, the model takes "
                           f"{tuple(defended.info.input_shape)}")
        qo, po, fo = _compare(defended, clean, xo.numpy(), batch_size)
        ood_stats = query_set_stats(f"{ood.info.name}/{ood.split}", qo, po, None, fo)
    latency = []
    if bench is not None:
        res = bench_runners([clean, defended], bench, names=["undefended", defended.info.defense])
        for bs in bench.batch_sizes:
            c, d = (r for r in res.rows if r.batch == bs)
            latency.append({"batch": bs, "clean_ms": c.p50_ms, "defended_ms": d.p50_ms,
                            "ratio": round(d.p50_ms / c.p50_ms, 4) if c.p50_ms > 0 else None})
    return DefenseMeasurement(artifact=str(defended.path), defense=defended.info.defense, placement=placement,
                              params=dict(params or {}), test=test_stats, ood=ood_stats, latency=latency)
