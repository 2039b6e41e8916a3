"""Fine-tuning removal attacks on a watermarked bundle: FTLL, FTAL, RTLL, RTAL (Adi et al., section 6
of the watermark spec).

| mode | re-initialise the last layer | trainable |
|------|------------------------------|-----------|
| ftll | no                           | last layer |
| ftal | no                           | all layers |
| rtll | yes                          | last layer |
| rtal | yes                          | all layers |

The attacker trains on ground-truth labels of its data (by default the owner's full training split,
as in the reference code; ``data_fraction`` or ``dataset`` change that) without the triggers.  As in
the reference code the model stays in train mode, so BatchNorm statistics of the "frozen" body still
move under FTLL/RTLL; ``freeze_bn`` runs the strict variant.  The result is what an outside verifier
sees: the attacked model as it is, never with the owner's last layer put back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from edgeguard.attacks.base import ATTACKS
from edgeguard.bundle import bundle_data_config, check_target, load_bundle, save_bundle, stage_record
from edgeguard.config import Config, DataConfig, require
from edgeguard.data import load_data
from edgeguard.errors import BadInput
from edgeguard.results import Result
from edgeguard.training import TrainConfig, fit, model_accuracy

MODES = ("ftll", "ftal", "rtll", "rtal")


@dataclass(frozen=True)
class FinetuneConfig(Config):
    mode: Literal["ftll", "ftal", "rtll", "rtal"] = "ftal"
    epochs: int = 20  # reference: 20
    lr: float = 0.01  # reference default 0.001, README examples 0.01
    batch_size: int = 64
    data_fraction: float = 1.0  # share of the attacker's dataset used (seeded subset)
    dataset: str | None = None  # attacker's dataset (registry name); default: the bundle's own training data
    data_root: str | None = None
    freeze_bn: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.epochs >= 1 and self.lr > 0 and self.batch_size >= 1, "epochs, lr and batch_size must be positive")
        require(0 < self.data_fraction <= 1, "data_fraction must lie in (0, 1]")


@dataclass(frozen=True)
class AttackResult(Result):
    bundle: str
    sha256: str
    mode: str
    samples: int
    epochs: int
    steps: int
    final_loss: float
    test_accuracy: float | None = None  # the attacked model on the bundle's test split
    diverged_at: int | None = None  # step whose loss was not finite (e.g. a MagicGuard model); training stopped there
    passed: bool = True

    def summary(self) -> str:
        acc = f", test accuracy {self.test_accuracy:.4f}" if self.test_accuracy is not None else ""
        div = (f"; the loss stopped being finite at step {self.diverged_at} (the model self-destructed), training "
               "stopped there" if self.diverged_at is not None else "")
        return (f"attacked bundle {self.bundle}: {self.mode} on {self.samples} images, {self.epochs} epochs "
                f"({self.steps} steps), final loss {self.final_loss:.4f}{acc}{div}")


class FreezeBN:
    """Hook: keep BatchNorm statistics fixed (eval mode) while the rest trains."""

    def on_epoch_start(self, state) -> None:
        for m in state.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


@ATTACKS.register("finetune", family="removal", config=FinetuneConfig)
def finetune_attack(source: str | Path, out: str | Path, cfg: FinetuneConfig | None = None) -> AttackResult:
    cfg = cfg or FinetuneConfig()
    check_target(out)
    bundle = load_bundle(source)
    spec = bundle.spec
    data_cfg = DataConfig(cfg.dataset, root=cfg.data_root) if cfg.dataset else bundle_data_config(bundle)
    data = load_data(data_cfg, "train")
    if data.info.input_shape != spec.input_shape or data.num_classes != spec.num_classes:
        raise BadInput(
            f"the attacker's dataset {data.info.name!r} ({data.num_classes} classes, {data.info.input_shape}) "
            f"does not fit the model ({spec.num_classes} classes, {spec.input_shape})"
        )
    if cfg.data_fraction < 1:
        g = torch.Generator().manual_seed(cfg.seed)
        n = max(1, int(round(len(data) * cfg.data_fraction)))
        data = data.subset(torch.randperm(len(data), generator=g)[:n])
    model = bundle.load_model()
    if cfg.mode.startswith("rt"):
        model.reset_classifier(generator=torch.Generator().manual_seed(cfg.seed))
    last_layer_only = cfg.mode.endswith("ll")
    result = fit(
        model, data,
        TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, schedule="none", seed=cfg.seed),
        params=model.is_head_parameter if last_layer_only else None,
        hooks=[FreezeBN()] if cfg.freeze_bn else [],
        desc=f"attack {cfg.mode}",
        stop_on_divergence=True,  # a self-destructing (MagicGuard) model may blow up: that wreck is the result
    )
    test = load_data(data_cfg, "test")
    acc = model_accuracy(model, test) if test.info.input_shape == spec.input_shape else None
    stage = stage_record("attack_finetune", cfg, data=data_cfg.to_dict(), samples=len(data), final=result.history[-1],
                         test_accuracy=acc, diverged_at=result.diverged_at)
    attacked = save_bundle(out, model, spec, stages=[*bundle.stages, stage], parent=bundle, keep_vault=False)
    return AttackResult(str(attacked.path), attacked.sha256, cfg.mode, len(data), result.epochs, result.steps,
                        result.history[-1]["loss"], acc, result.diverged_at)

