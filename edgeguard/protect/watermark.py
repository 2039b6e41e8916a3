"""Backdoor (trigger-set) watermark of Adi et al., USENIX Security 2018.

Embedding mixes a batch of trigger images into every clean batch of the one training loop, either
continuing from the owner's trained bundle (``pretrained``, default) or training anew
(``fromscratch``).  The key -- rendered uint8 images and their labels -- goes to the owner's vault;
the manifest records only its sha256 (a commitment that can be published).

Verification runs the stored triggers through any Runner (bundle, ONNX, engine) and decides with the
exact binomial tail: under H0 each random-label trigger matches with probability 1/k.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from edgeguard.bundle import (
    Bundle,
    Vault,
    bundle_data_config,
    check_target,
    load_bundle,
    save_bundle,
    stage_record,
)
from edgeguard.config import Config, config_from_dict, require
from edgeguard.data import load_data
from edgeguard.errors import BadInput
from edgeguard.models.guard import owner_gradients
from edgeguard.progress import log
from edgeguard.protect.trigger_files import load_trigger_dir
from edgeguard.protect.triggers import TriggerSet, generate_triggers
from edgeguard.results import Result
from edgeguard.runtime import Runner
from edgeguard.stats import binomial_tail, decision_threshold
from edgeguard.training import Mix, TensorData, TrainConfig, fit

VAULT_RECORD = "watermark"
VAULT_TRIGGERS = "watermark_triggers"


@dataclass(frozen=True)
class WatermarkConfig(Config):
    mode: Literal["pretrained", "fromscratch"] = "pretrained"
    n_triggers: int = 100  # generated keys only; a trigger directory brings its own count
    trigger_batch: int = 16  # trigger images appended to every clean batch (Adi: 2 per 100 on CIFAR)
    epochs: int = 20  # upper bound (pretrained) or the whole schedule (fromscratch)
    lr: float = 0.01  # pretrained: SGD lr (docs/watermark.md); fromscratch uses the bundle's own training recipe
    stop_after: int = 3  # pretrained: stop once every trigger matches at this many consecutive epoch ends
    alpha: float = 1e-3  # significance of the verdict
    trigger_dir: str | None = None
    labels: str | None = None
    renderer: Literal["center_crop", "resize"] = "center_crop"
    seed: int = 0  # training seed (not the key: the key seed is secret and lives in the vault only)

    def __post_init__(self) -> None:
        require(self.n_triggers >= 1 and self.trigger_batch >= 1, "n_triggers and trigger_batch must be >= 1")
        require(self.epochs >= 1 and self.lr > 0, "epochs must be >= 1 and lr > 0")
        require(0 < self.alpha < 1, "alpha must lie in (0, 1)")
        require(self.labels is None or self.trigger_dir is not None, "labels needs trigger_dir")


@dataclass(frozen=True)
class EmbedResult(Result):
    bundle: str
    sha256: str
    key_sha256: str
    n: int
    epochs: int
    trigger_accuracy: float  # on the trained module at the end (training-time signal; verify on artifacts)
    history: tuple[dict[str, float], ...]
    passed: bool = True

    def summary(self) -> str:
        return (f"watermarked bundle {self.bundle}: {self.n} triggers (key sha256 {self.key_sha256[:16]}), "
                f"{self.epochs} epochs, trigger accuracy {self.trigger_accuracy:.3f} during training; "
                f"the key is in {Path(self.bundle) / 'vault'}")


def _train_config(bundle: Bundle) -> TrainConfig:
    for st in bundle.stages:
        if st.get("stage") == "train" and "config" in st:
            return config_from_dict(st["config"])  # type: ignore[return-value]
    return TrainConfig()


def make_key(cfg: WatermarkConfig, input_shape: tuple[int, int, int], num_classes: int, key_seed: int | None):
    """(trigger set, key seed or None): from a WatermarkNN-style folder, or generated from a secret seed."""
    if cfg.trigger_dir is not None:
        return load_trigger_dir(cfg.trigger_dir, cfg.labels, input_shape, num_classes, renderer=cfg.renderer), None
    if key_seed is None:
        key_seed = secrets.randbits(62)  # CSPRNG: the key is secret unless the owner chose the seed
    if not 0 <= int(key_seed) < 2**63:
        raise BadInput(f"the key seed must lie in 0..2^63-1 (got {key_seed})")
    return generate_triggers(cfg.n_triggers, input_shape, num_classes, seed=key_seed), key_seed


class _TriggerMonitor:
    """Epoch-end trigger accuracy of the module being trained; stops after ``stop_after`` perfect epochs."""

    def __init__(self, key: TriggerSet, stop_after: int):
        self.x, self.y = key.as_float(), key.labels
        self.stop_after, self.streak = stop_after, 0

    def on_epoch_end(self, state) -> None:
        model = state.model
        was = model.training
        model.eval()
        with torch.no_grad():
            acc = float((model(self.x.to(next(model.parameters()).device)).argmax(1).cpu() == self.y).float().mean())
        model.train(was)
        state.metrics["trigger_accuracy"] = round(acc, 4)
        self.streak = self.streak + 1 if acc == 1.0 else 0
        log(f"watermark: epoch {state.epoch + 1} trigger accuracy {acc:.3f}")
        if self.stop_after and self.streak >= self.stop_after:
            state.stop = True


def embed_watermark(
    source: str | Path, out: str | Path, cfg: WatermarkConfig | None = None, *, key_seed: int | None = None
) -> EmbedResult:
    """Embed a trigger-set watermark into ``source`` (a bundle) and write the marked bundle to ``out``."""

    cfg = cfg or WatermarkConfig()
    check_target(out)
    bundle = load_bundle(source)
    spec = bundle.spec
    key, key_seed = make_key(cfg, spec.input_shape, spec.num_classes, key_seed)
    if key.input_shape != spec.input_shape:
        raise BadInput(f"the trigger images are {key.input_shape} but the model takes {spec.input_shape}")
    if decision_threshold(len(key), 1.0 / spec.num_classes, cfg.alpha) > len(key):
        raise BadInput(
            f"{len(key)} triggers can never give a significant verdict at alpha {cfg.alpha:g} with "
            f"{spec.num_classes} classes; use more triggers"
        )
    if int(key.labels.max()) >= spec.num_classes:
        raise BadInput(f"trigger labels reach {int(key.labels.max())} but the model has {spec.num_classes} classes")
    data = load_data(bundle_data_config(bundle), "train")
    if data.info.input_shape != spec.input_shape or data.num_classes != spec.num_classes:
        raise BadInput(f"the bundle's training data no longer matches the model ({data.info.input_shape}, {data.num_classes} classes)")

    if cfg.mode == "pretrained":
        model = bundle.load_model()
        train_cfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, schedule="none", seed=cfg.seed)
        monitor = _TriggerMonitor(key, cfg.stop_after)
    else:
        torch.manual_seed(cfg.seed)
        model = spec.build()
        train_cfg = _train_config(bundle).replace(seed=cfg.seed)
        monitor = _TriggerMonitor(key, 0)
    with owner_gradients(model):  # a guarded bundle: the owner's own fine-tuning bypasses the guard's ripple
        result = fit(
            model, data, train_cfg, extra=Mix(TensorData(key.as_float(), key.labels), cfg.trigger_batch),
            hooks=[monitor], desc=f"watermark ({cfg.mode})",
        )
    final_acc = result.history[-1].get("trigger_accuracy", 0.0)
    record = {
        "scheme": "adi2018-backdoor",
        "key_sha256": key.sha256,
        "n": len(key),
        "num_classes": spec.num_classes,
        "input_shape": list(spec.input_shape),
        "alpha": cfg.alpha,
        "source": key.source,
        "renderer": key.renderer,
        "files": list(key.files),
        "key_seed": key_seed,  # secret: vault only
        "embedded_in": None,
    }
    stage = stage_record(
        "watermark", cfg, key_sha256=key.sha256, n=len(key), epochs=result.epochs,
        trigger_accuracy=final_acc, train=train_cfg.to_dict(),
    )
    marked = save_bundle(out, model, spec, stages=[*bundle.stages, stage], parent=bundle)
    vault = marked.vault
    vault.put_tensors(VAULT_TRIGGERS, {"images": key.images, "labels": key.labels})
    vault.put_json(VAULT_RECORD, dict(record, embedded_in=marked.sha256))
    return EmbedResult(str(marked.path), marked.sha256, key.sha256, len(key), result.epochs, final_acc, result.history)


@dataclass(frozen=True)
class WatermarkVerification(Result):
    artifact: dict[str, Any]
    key_sha256: str
    n: int
    k: int
    matches: int
    trigger_accuracy: float
    p_value: float
    alpha: float
    m_star: int
    verdict: str  # "present" | "absent"
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.verdict == "present"

def read_key(vault: Vault) -> tuple[TriggerSet, dict[str, Any]]:
    if VAULT_RECORD not in vault:
        raise BadInput(f"vault {vault.path} holds no watermark (embed one with: edgeguard protect watermark)")
    record = vault.get_json(VAULT_RECORD)
    t = vault.get_tensors(VAULT_TRIGGERS)
    key = TriggerSet(t["images"], t["labels"], record.get("source", "?"), record.get("renderer", "?"))
    if key.sha256 != record["key_sha256"]:
        raise BadInput(f"the watermark key in {vault.path} does not match its recorded sha256; refusing to use it")
    return key, record


def verify_watermark(runner: Runner, vault: Vault, *, alpha: float | None = None) -> WatermarkVerification:
    """Matches of the artifact on the stored triggers, the binomial p-value at chance 1/k, the verdict."""
    key, record = read_key(vault)
    info = runner.info
    k = int(record["num_classes"])
    shape = tuple(record["input_shape"])
    if info.num_classes != k or any(a is not None and a != b for a, b in zip(info.input_shape, shape, strict=True)):
        raise BadInput(
            f"the watermark in {vault.path} is for a {k}-class {'x'.join(map(str, shape))} model, "
            f"but {runner.path} has {info.num_classes} classes and takes {'x'.join(str(d) for d in info.input_shape)}"
        )
    alpha = float(alpha if alpha is not None else record.get("alpha", 1e-3))
    if not 0 < alpha < 1:
        raise BadInput("alpha must lie in (0, 1)")
    runner.expect(len(key))
    preds = runner.predict(key.images.numpy()).argmax(1)
    matches = int(np.sum(preds == key.labels.numpy()))
    n = len(key)
    m_star = decision_threshold(n, 1.0 / k, alpha)
    return WatermarkVerification(
        artifact=info.to_json(),
        key_sha256=key.sha256,
        n=n,
        k=k,
        matches=matches,
        trigger_accuracy=round(matches / n, 6),
        p_value=binomial_tail(matches, n, 1.0 / k),
        alpha=alpha,
        m_star=m_star,
        verdict="present" if matches >= m_star else "absent",
        note="" if record.get("source") == "generated" else (
            "key loaded from files: the binomial null holds only if its labels were drawn at random and the "
            "images were never public (a published set proves nothing about ownership)"),
    )
