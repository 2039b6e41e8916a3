"""Sensitivity of fragile triggers to fine-tuning (docs/fragile.md, the paper's Fig. 2 / Table 4).

For each generator variant (``non`` untrained, ``cla`` CE only, ``full`` CE + a·Var) one trigger set is generated
against the bundle's model; then, for each regime (``last``: the classifier only, BatchNorm statistics frozen;
``all``: every parameter) and each seed, a copy of the model is fine-tuned the way the paper's adversary does --
SGD lr 1e-3, momentum 0.9, weight decay 5e-4, batch 128, on the training set plus 10% of it turned into BIM
"backdoor" samples relabelled to class 0 -- and AccTri of every trigger set (against its reference labels) is
measured after each epoch.  A trial detects the modification when AccTri < 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeguard.attacks.removal import FreezeBN
from edgeguard.bundle import bundle_data_config, load_bundle
from edgeguard.config import Config, require
from edgeguard.data import load_data
from edgeguard.errors import BadInput
from edgeguard.evaluate.plots import pyplot, save_panels
from edgeguard.progress import log
from edgeguard.protect.fragile import VARIANTS, FragileConfig, FragileKey, generate
from edgeguard.training import TensorData, TrainConfig, fit

REGIMES = ("last", "all")


@dataclass(frozen=True)
class SensitivityConfig(Config):
    variants: tuple[str, ...] = ("non", "cla", "full")
    regimes: tuple[str, ...] = REGIMES
    epochs: int = 5
    seeds: tuple[int, ...] = tuple(range(20))  # fine-tuning trials (data order, backdoor subset)
    lr: float = 1e-3  # the paper's SGD lr for ResNet-18
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    backdoor_fraction: float = 0.1  # of the training set, BIM-perturbed and relabelled to backdoor_target
    backdoor_target: int = 0
    bim_eps: float = 8 / 255
    bim_step: float = 1 / 255
    bim_iters: int = 10
    generator: FragileConfig = field(default_factory=FragileConfig)

    def __post_init__(self) -> None:
        require(all(v in VARIANTS for v in self.variants) and self.variants, f"variants must be among {', '.join(VARIANTS)}")
        require(all(r in REGIMES for r in self.regimes) and self.regimes, f"regimes must be among {', '.join(REGIMES)}")
        require(self.epochs >= 1 and len(self.seeds) >= 1, "sensitivity needs epochs >= 1 and at least one seed")
        require(0 <= self.backdoor_fraction <= 1, "backdoor_fraction must lie in [0, 1]")


def bim(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step: float, iters: int,
        batch: int = 256) -> torch.Tensor:
    """Basic Iterative Method (Kurakin et al.), untargeted L_inf: ``iters`` signed-gradient ascent steps on the
    cross-entropy of the true labels, projected onto the eps-ball and [0, 1]."""
    was = model.training
    model.eval()
    out = []
    try:
        for s in range(0, len(x), batch):
            x0, y0 = x[s : s + batch].float(), y[s : s + batch]
            adv = x0.clone()
            for _ in range(iters):
                adv.requires_grad_(True)
                with torch.enable_grad():
                    (g,) = torch.autograd.grad(F.cross_entropy(model(adv), y0), adv)
                with torch.no_grad():
                    adv = torch.min(torch.max(adv + step * g.sign(), x0 - eps), x0 + eps).clamp_(0.0, 1.0)
            out.append(adv.detach())
    finally:
        model.train(was)
    return torch.cat(out) if out else x[:0].clone()


class _AccTriPerEpoch:
    def __init__(self, keys: dict[str, FragileKey]):
        self.keys = keys
        self.curves: dict[str, list[float]] = {v: [] for v in keys}

    def on_epoch_end(self, state) -> None:
        model = state.model
        was = model.training
        model.eval()
        with torch.no_grad():
            for v, key in self.keys.items():
                pred = model(key.as_float()).argmax(1)
                self.curves[v].append(round(float((pred == key.key).float().mean()), 6))
        model.train(was)


@dataclass(frozen=True)
class SensitivityResult:
    config: dict[str, Any]
    keys: dict[str, dict[str, Any]]  # variant -> generation stats
    trials: list[dict[str, Any]]  # {regime, seed, curves: {variant: [AccTri after epoch 1..E]}}
    passed: bool = True

    def summary(self) -> list[dict[str, Any]]:
        rows = []
        for regime in dict.fromkeys(t["regime"] for t in self.trials):
            ts = [t for t in self.trials if t["regime"] == regime]
            for v in self.keys:
                first = np.array([t["curves"][v][0] for t in ts])
                every = np.array([t["curves"][v] for t in ts])
                rows.append({"regime": regime, "variant": v, "trials": len(ts),
                             "acctri_epoch1_mean": round(float(first.mean()), 4),
                             "acctri_epoch1_max": round(float(first.max()), 4),
                             "detected_epoch1": int((first < 1.0).sum()),
                             "acctri_mean_all_epochs": round(float(every.mean()), 4)})
        return rows

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "keys": self.keys, "summary": self.summary(), "trials": self.trials}

    def table(self) -> str:
        lines = ["| regime | generator | trials | AccTri after 1 epoch (mean / max) | detected after 1 epoch | mean AccTri, all epochs |",
                 "|---|---|---:|---:|---:|---:|"]
        for r in self.summary():
            lines.append(f"| {r['regime']} | {r['variant']} | {r['trials']} | {r['acctri_epoch1_mean']:.3f} / "
                         f"{r['acctri_epoch1_max']:.3f} | {r['detected_epoch1']}/{r['trials']} | {r['acctri_mean_all_epochs']:.3f} |")
        return "\n".join(lines)


def run_sensitivity(source: str | Path, cfg: SensitivityConfig | None = None, *, quiet: bool | None = True) -> SensitivityResult:
    """Generate one trigger set per variant against the float bundle ``source`` and measure AccTri per fine-tuning
    epoch for every regime and seed."""

    cfg = cfg or SensitivityConfig()
    bundle = load_bundle(source)
    spec = bundle.spec
    model = bundle.load_model()
    keys: dict[str, FragileKey] = {}
    for v in cfg.variants:
        log(f"sensitivity: generating the {v!r} trigger set", quiet=quiet)
        keys[v] = generate(model, tuple(spec.input_shape), spec.num_classes, cfg.generator.replace(variant=v), quiet=True)
    data = load_data(bundle_data_config(bundle), "train")
    if data.info.input_shape != spec.input_shape or data.num_classes != spec.num_classes:
        raise BadInput(f"the bundle's training data ({data.num_classes} classes, {data.info.input_shape}) does not fit the model")
    x, y = data.tensors(0, len(data))
    n_bd = int(round(cfg.backdoor_fraction * len(x)))
    trials = []
    for seed in cfg.seeds:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(x), generator=g)[:n_bd]
        x_bd = bim(model, x[idx], y[idx], eps=cfg.bim_eps, step=cfg.bim_step, iters=cfg.bim_iters)
        train = TensorData(torch.cat([x, x_bd]), torch.cat([y, torch.full((n_bd,), cfg.backdoor_target, dtype=y.dtype)]))
        for regime in cfg.regimes:
            copy = bundle.load_model()
            probe = _AccTriPerEpoch(keys)
            fit(copy, train, TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay, schedule="none", seed=seed),
                params=copy.is_head_parameter if regime == "last" else None,
                hooks=[FreezeBN(), probe] if regime == "last" else [probe], desc=f"fine-tune {regime} seed {seed}",
                quiet=True, stop_on_divergence=True)
            trials.append({"regime": regime, "seed": seed, "curves": probe.curves})
        log(f"sensitivity: seed {seed}: " + ", ".join(
            f"{t['regime']} {v} {t['curves'][v][0]:.2f}" for t in trials[-len(cfg.regimes):] for v in keys), quiet=quiet)
    stats = {v: {k: val for k, val in k_.stats.items() if k != "model_sha256"} for v, k_ in keys.items()}
    return SensitivityResult(cfg.to_dict(), stats, trials)


def plot_sensitivity(result: SensitivityResult | dict[str, Any], path: str | Path) -> Path | None:
    """Mean AccTri (band: min-max over seeds) per fine-tuning epoch, one panel per regime, one line per generator."""

    plt = pyplot()
    if plt is None:
        return None
    trials = result.trials if isinstance(result, SensitivityResult) else result["trials"]
    variants = list(trials[0]["curves"])
    regimes = list(dict.fromkeys(t["regime"] for t in trials))
    colors = {"non": "tab:gray", "cla": "tab:blue", "var": "tab:green", "full": "tab:red"}
    names = {"non": "untrained G", "cla": "CE only", "var": "Var only", "full": "CE + a·Var"}
    fig, axes = plt.subplots(1, len(regimes), figsize=(3.8 * len(regimes), 3.2), squeeze=False, sharey=True)
    for ax, regime in zip(axes[0], regimes, strict=True):
        for v in variants:
            c = np.array([t["curves"][v] for t in trials if t["regime"] == regime])
            ep = np.arange(0, c.shape[1] + 1)
            full = np.concatenate([np.ones((len(c), 1)), c], axis=1)  # AccTri 1.0 before fine-tuning, by enrolment
            ax.plot(ep, full.mean(0), color=colors.get(v), label=names.get(v, v))
            ax.fill_between(ep, full.min(0), full.max(0), color=colors.get(v), alpha=0.15)
        ax.set_title("last layer" if regime == "last" else "all layers", fontsize=9)
        ax.set_xlabel("fine-tuning epochs")
        ax.set_ylim(-0.02, 1.02)
    return save_panels(fig, axes, path, "AccTri")
