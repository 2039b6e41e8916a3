"""The one training loop.  Training, watermark embedding, fine-tuning attacks, QAT, surrogate and
generator training all call :func:`fit`; callers differ only in data, loss, step and hooks.

    result = fit(model, train_data, TrainConfig(epochs=10, lr=0.05), val_data=test_data)

* ``data`` is anything with ``batches(batch_size, shuffle=, generator=)`` and ``len``: an
  :class:`~edgeguard.data.ImageDataset`, or :class:`TensorData` for arbitrary (x, y) tensors such as
  images with soft labels from a victim.
* ``extra=Mix(data, batch_size)`` concatenates a batch from a second source to every step (trigger
  sets for watermark embedding).
* ``loss(logits, y)`` replaces cross-entropy; ``step(state, x, y) -> loss`` replaces the forward pass
  (if the returned loss has no grad, the step is assumed to have updated the model itself).
* ``params(name, p) -> bool`` restricts which parameters train (the rest are frozen for the run).
* ``hooks`` get ``on_fit_start / on_epoch_start / on_step_end / on_epoch_end(state)`` and may set ``state.stop``.

Seeding, device placement, augmentation, schedules, early stopping and progress live only here.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from edgeguard.config import Config, require
from edgeguard.data.base import batch_indices
from edgeguard.errors import BackendUnavailable, BadInput, CheckFailed
from edgeguard.progress import task


@dataclass(frozen=True)
class TrainConfig(Config):
    epochs: int = 10
    batch_size: int = 64
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "step", "none"] = "cosine"
    step_epochs: int = 0  # "step" schedule: decay every this many epochs (0: a third of the run)
    gamma: float = 0.1  # "step" schedule: decay factor
    augment: Literal["none", "shift", "crop_flip"] = "none"
    label_smoothing: float = 0.0
    early_stop_patience: int = 0  # epochs without validation improvement before stopping (0: off)
    max_steps: int = 0  # stop after this many optimizer steps (0: no limit)
    grad_clip: float = 0.0  # max gradient norm (0: off)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        require(self.epochs >= 1, "epochs must be at least 1")
        require(self.batch_size >= 1, "batch_size must be at least 1")
        require(self.lr > 0, "lr must be positive")
        require(0 <= self.label_smoothing < 1, "label_smoothing must lie in [0, 1)")
        require(self.early_stop_patience >= 0 and self.max_steps >= 0, "early_stop_patience and max_steps must be >= 0")
        require(re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None, "device must be cpu, cuda or cuda:N")


class Batches(Protocol):
    def __len__(self) -> int: ...

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class TensorData:
    """(x, y) tensors as a training source; y may be class indices or soft labels (N, K)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if len(x) != len(y):
            raise BadInput(f"TensorData: {len(x)} inputs but {len(y)} targets")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None):
        for idx in batch_indices(len(self), batch_size, shuffle=shuffle, generator=generator):
            yield self.x[idx], self.y[idx]


@dataclass(frozen=True)
class Mix:
    """Extra batches mixed into every training step (e.g. a watermark trigger set)."""

    data: Batches
    batch_size: int


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    epoch: int = 0
    step: int = 0
    last_loss: float = math.nan
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    stop: bool = False
    diverged_at: int | None = None


@dataclass(frozen=True)
class FitResult:
    epochs: int
    steps: int
    seconds: float
    stopped_early: bool
    best_val_accuracy: float | None
    history: tuple[dict[str, float], ...]
    diverged_at: int | None = None  # the step whose loss was not finite (stop_on_divergence)

    def to_json(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "stopped_early": self.stopped_early,
            "best_val_accuracy": self.best_val_accuracy,
            "history": list(self.history),
            "diverged_at": self.diverged_at,
        }


def resolve_device(device: str | None) -> torch.device:
    device = device or "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise BadInput(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable(f"device {device!r} was requested but no CUDA GPU is available; use --device cpu")
    return torch.device(device)


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Random integer shifts (zero padded) and, for ``crop_flip``, horizontal flips; per sample."""
    if mode == "none":
        return x
    n, _, h, w = x.shape
    pad = 2 if mode == "shift" else 4
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)  # (n,h)
    cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)  # (n,w)
    if mode == "crop_flip":
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # (n,h,w,c)
    return out.permute(0, 3, 1, 2).contiguous()


def default_loss(cfg: TrainConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.dtype.is_floating_point:  # soft labels (N, K)
            return torch.sum(-y * F.log_softmax(logits, dim=1), dim=1).mean()
        return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)

    return loss


def _make_optimizer(params: Sequence[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    if cfg.schedule == "cosine":
        return lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))
    if cfg.schedule == "step":
        every = max(1, (cfg.step_epochs or max(1, cfg.epochs // 3)) * steps_per_epoch)
        return lambda s: cfg.gamma ** (s // every)
    return lambda s: 1.0


@torch.no_grad()
def model_accuracy(model: nn.Module, data: Batches, device: torch.device | str = "cpu", batch_size: int = 256) -> float:
    """Top-1 accuracy of a PyTorch model on (x, y) batches; rows with a non-finite output count as wrong."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in data.batches(batch_size):
        z = model(x.to(device)).cpu()
        target = y.argmax(1) if y.dtype.is_floating_point else y
        correct += int(((z.argmax(1) == target) & torch.isfinite(z).all(1)).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(1, total)


def _cycle(source: Mix, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yielded = False
        for batch in source.data.batches(source.batch_size, shuffle=True, generator=generator):
            yielded = True
            yield batch
        if not yielded:
            raise BadInput("the extra data mixed into training is empty")


class _Loop:
    """One fit() call's per-step state: the optimiser step on a batch, with the hooks and the divergence check."""

    def __init__(self, state: TrainState, *, device, gen, layout, extra_iter, scheduler, step, loss_fn, selected,
                 stop_on_divergence: bool, hooks: Sequence[Any]):
        self.state, self.device, self.gen, self.layout, self.extra_iter = state, device, gen, layout, extra_iter
        self.scheduler, self.step, self.loss_fn, self.selected = scheduler, step, loss_fn, selected
        self.stop_on_divergence, self.hooks = stop_on_divergence, hooks

    def hook(self, name: str) -> None:
        for h in self.hooks:
            getattr(h, name, lambda s: None)(self.state)

    def _batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.state.cfg
        x = augment_batch(x.to(self.device), cfg.augment, self.gen)  # clean data only: extra batches stay as given
        if self.extra_iter is not None:
            ex, ey = next(self.extra_iter)
            x, y = torch.cat([x, ex.to(device=self.device, dtype=x.dtype)]), torch.cat([y, ey.to(y.dtype)])
        if self.layout is not None and x.dim() == 4:
            x = x.contiguous(memory_format=self.layout)
        return x, y.to(self.device)

    def epoch(self, data: Batches, bar) -> tuple[float, int, int]:
        """One pass over ``data``: (summed loss, rows seen, correct top-1 where logits exist)."""
        state, cfg, model, optimizer = self.state, self.state.cfg, self.state.model, self.state.optimizer
        loss_sum, n_seen, correct = 0.0, 0, 0
        for x, y in data.batches(cfg.batch_size, shuffle=True, generator=self.gen):
            x, y = self._batch(x, y)
            optimizer.zero_grad(set_to_none=True)
            if self.step is not None:
                value, logits = self.step(state, x, y), None
            else:
                logits = model(x)
                value = self.loss_fn(logits, y)
            state.last_loss = float(value.detach())
            if not math.isfinite(state.last_loss):  # checked before the update: it is never applied
                state.step += 1
                if self.stop_on_divergence:
                    state.diverged_at, state.stop = state.step, True
                    break
                raise CheckFailed(f"training diverged at step {state.step} (loss {state.last_loss}); lower the "
                                  "learning rate. Nothing was written")
            if value.requires_grad:
                value.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_([p for _, p in self.selected], cfg.grad_clip)
                optimizer.step()
            self.scheduler.step()
            state.step += 1
            loss_sum += state.last_loss * len(y)
            n_seen += len(y)
            if logits is not None:
                target = y.argmax(1) if y.dtype.is_floating_point else y
                correct += int((logits.detach().argmax(1) == target).sum())
            bar.advance()
            self.hook("on_step_end")
            if state.stop or (cfg.max_steps and state.step >= cfg.max_steps):
                break
        return loss_sum, n_seen, correct


def _epoch_metrics(epoch: int, loss_sum: float, n_seen: int, optimizer, t_epoch: float,
                   correct: int | None) -> dict[str, Any]:
    metrics = {"epoch": epoch + 1, "loss": round(loss_sum / max(1, n_seen), 6), "lr": optimizer.param_groups[0]["lr"],
               "seconds": round(time.perf_counter() - t_epoch, 3)}
    if correct is not None:
        metrics["train_accuracy"] = round(correct / max(1, n_seen), 6)
    return metrics


class _Best:
    """The best validation accuracy so far, epochs since, and (``keep``: early stopping) that epoch's weights."""

    def __init__(self, keep: bool):
        self.keep, self.accuracy, self.state, self.since = keep, None, None, 0

    def update(self, model: nn.Module, acc: float) -> float:
        if self.accuracy is None or acc > self.accuracy:
            self.accuracy, self.since = acc, 0
            if self.keep:
                self.state = copy.deepcopy(model.state_dict())
        else:
            self.since += 1
        return acc


def _select(model: nn.Module, params: Callable[[str, nn.Parameter], bool] | None):
    """(trained parameters, parameters frozen for this call): ``params`` picks by name; the others stop needing
    gradients until fit() returns."""
    named = list(model.named_parameters())
    selected = [(n, p) for n, p in named if params is None or params(n, p)]
    if not selected:
        raise BadInput("no parameters are selected for training")
    frozen = [p for n, p in named if params is not None and not params(n, p) and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    return selected, frozen


def fit(
    model: nn.Module,
    data: Batches,
    cfg: TrainConfig,
    *,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    extra: Mix | None = None,
    step: Callable[[TrainState, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    params: Callable[[str, nn.Parameter], bool] | None = None,
    hooks: Sequence[Any] = (),
    val_data: Batches | None = None,
    desc: str = "train",
    quiet: bool | None = None,
    stop_on_divergence: bool = False,
    channels_last: bool = False,
) -> FitResult:
    """Train ``model`` in place on ``data`` under ``cfg``; returns the per-epoch history.

    A non-finite loss raises :class:`CheckFailed`, unless ``stop_on_divergence``: then training stops before that
    step's update and ``FitResult.diverged_at`` records the step (attacks on self-destructing models want the
    wrecked model, not an error).  ``channels_last`` trains in NHWC memory (oneDNN's fast layout for convolutions
    on CPU: 1.37x per step on smallcnn, one thread) and hands the model back in the usual layout; for plain
    convolutional models whose forward does not ``view`` its activations."""
    if len(data) == 0:
        raise BadInput("the training data is empty")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.to(device)
    layout = torch.channels_last if channels_last else None
    if layout is not None:
        model.to(memory_format=layout)  # parameters keep their identity: only their storage order changes
    selected, frozen = _select(model, params)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    optimizer = _make_optimizer([p for _, p in selected], cfg)
    state = TrainState(model=model, optimizer=optimizer, cfg=cfg)
    loop = _Loop(state, device=device, gen=gen, layout=layout, extra_iter=_cycle(extra, gen) if extra is not None else None,
                 scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg, steps_per_epoch)), step=step,
                 loss_fn=loss or default_loss(cfg), selected=selected, stop_on_divergence=stop_on_divergence, hooks=hooks)
    best = _Best(keep=bool(cfg.early_stop_patience))
    stopped_early = False
    t0 = time.perf_counter()
    loop.hook("on_fit_start")
    try:
        total_steps = cfg.epochs * steps_per_epoch if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
        with task(desc, total_steps, quiet=quiet) as bar:
            for epoch in range(cfg.epochs):
                state.epoch = epoch
                model.train()
                loop.hook("on_epoch_start")
                t_epoch = time.perf_counter()
                loss_sum, n_seen, correct = loop.epoch(data, bar)
                metrics = _epoch_metrics(epoch, loss_sum, n_seen, optimizer, t_epoch, correct if step is None else None)
                if val_data is not None:
                    metrics["val_accuracy"] = round(best.update(model, model_accuracy(model, val_data, device)), 6)
                state.metrics = metrics
                state.history.append(metrics)
                bar.note(f"epoch {epoch + 1}/{cfg.epochs} loss {metrics['loss']:.4f}"
                         + (f" train {metrics['train_accuracy']:.4f}" if "train_accuracy" in metrics else "")
                         + (f" val {metrics['val_accuracy']:.4f}" if "val_accuracy" in metrics else ""))
                loop.hook("on_epoch_end")
                if cfg.early_stop_patience and val_data is not None and best.since >= cfg.early_stop_patience:
                    stopped_early = True
                    break
                if state.stop or (cfg.max_steps and state.step >= cfg.max_steps):
                    break
    finally:
        for p in frozen:
            p.requires_grad_(True)
        if layout is not None:
            model.to(memory_format=torch.contiguous_format)
    if best.state is not None and stopped_early:
        model.load_state_dict(best.state)
    model.eval()
    return FitResult(epochs=len(state.history), steps=state.step, seconds=time.perf_counter() - t0,
                     stopped_early=stopped_early, best_val_accuracy=best.accuracy, history=tuple(state.history),
                     diverged_at=state.diverged_at)
