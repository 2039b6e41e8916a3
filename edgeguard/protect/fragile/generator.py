"""The trigger generator (Yin et al., ICIP 2022): a small generator G trained against the frozen classifier so that
trigger i is labelled s_i = i mod M with a softmax as flat as possible.  Method, choice of ``a`` and measurements:
:mod:`edgeguard.protect.fragile` and docs/fragile.md."""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeguard.config import Config, require
from edgeguard.errors import BadInput, CheckFailed
from edgeguard.models.guard import owner_gradients
from edgeguard.progress import log
from edgeguard.protect.fragile.refine import _margins, _pixel_search, _refine, row_variance
from edgeguard.training import TensorData, TrainConfig, fit

VARIANTS = ("full", "cla", "var", "non")  # CE + a*Var, CE only, Var only, untrained generator (docs/fragile.md)


@dataclass(frozen=True)
class FragileConfig(Config):
    n: int = 100
    a: float | None = None  # weight of Var(P); default: from ``margin`` (a_for_margin)
    margin: float = 0.2  # target log-probability margin of the key class at the optimum of L (sets a when a is None)
    latent: int = 512
    steps: int = 300  # full-batch generator steps ("epochs" in the paper)
    max_steps: int | None = None  # keep training in chunks of 100 steps until AccTri on C is 1.0; default max(3000, steps)
    lr: float = 1e-3
    floor: float = 50.0  # b: margin floor b * mean relu(gamma - m_i) (docs/fragile.md), only in steps past ``steps`` (fallback)
    floor_margin: float | None = None  # gamma, in logits; default: half of ``margin``
    refine_steps: int = 600  # last resort: per-trigger pixel steps for the triggers the generator left off their key
    refine_lr: float = 0.05
    max_rekeyed: float = 0.1  # at most this fraction of triggers may keep the model's own label after refinement
    variant: Literal["full", "cla", "var", "non"] = "full"
    uint8: bool = True  # store triggers as uint8 (what the Runner input path consumes losslessly)
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.n >= 1 and self.latent >= 1, "fragile n and latent must be >= 1")
        require(self.a is None or self.a >= 0, "fragile a must be >= 0")
        require(self.margin > 0, "fragile margin must be > 0")
        require(self.refine_steps >= 0 and self.refine_lr > 0, "fragile refine_steps must be >= 0, refine_lr > 0")
        require(0 <= self.max_rekeyed < 1, "fragile max_rekeyed must be in [0, 1)")
        require(self.floor >= 0 and (self.floor_margin is None or self.floor_margin > 0), "fragile floor must be >= 0, floor_margin > 0")
        require(self.steps >= 1 and (self.max_steps is None or self.max_steps >= self.steps),
                "fragile steps must be >= 1 and <= max_steps")
        require(self.variant in VARIANTS, f"fragile variant must be one of {', '.join(VARIANTS)}")

    @property
    def step_limit(self) -> int:
        """The most generator steps, fallback included."""
        return self.max_steps if self.max_steps is not None else max(3000, self.steps)

    def weight(self, num_classes: int) -> float:
        if self.variant == "cla":
            return 0.0
        if self.a is not None:
            return float(self.a)
        return a_for_margin(num_classes, self.margin)


def a_for_margin(num_classes: int, margin: float) -> float:
    """The weight a at which the optimum of CE + a·Var (the other M-1 classes equal) has log p_key - log p_other =
    ``margin``: stationarity gives p (M p - 1) = M (M - 1) / (2a).  a = 200 <-> margin 0.86 for M = 10."""
    m = num_classes
    p = math.exp(margin) / (math.exp(margin) + m - 1)
    return m * (m - 1) / (2 * p * (m * p - 1))


def secret_key(n: int, num_classes: int) -> torch.Tensor:
    """s_i = i mod M (docs/fragile.md)."""
    return torch.arange(n) % num_classes


class Generator(nn.Module):
    """DCGAN-style generator for 32x32 (docs/fragile.md): 512 -> 256x4x4 -> 128x8x8 -> 64x16x16 -> Cx32x32, pixels in [0, 1];
    resized to the model's H x W when that differs."""

    def __init__(self, latent: int = 512, channels: int = 3, size: tuple[int, int] = (32, 32)):
        super().__init__()
        self.size = size
        self.fc = nn.Sequential(nn.Linear(latent, 256 * 16, bias=False), nn.BatchNorm1d(256 * 16), nn.ReLU(True))
        self.net = nn.Sequential(
            nn.ConvTranspose2d(256, 128, 4, 2, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(True),
            nn.ConvTranspose2d(128, 64, 4, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(True),
            nn.ConvTranspose2d(64, channels, 4, 2, 1), nn.Tanh(),
        )

    def init_weights(self, generator: torch.Generator) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.ConvTranspose2d)):
                with torch.no_grad():
                    m.weight.normal_(0.0, 0.02, generator=generator)
                    if m.bias is not None:
                        m.bias.zero_()
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                with torch.no_grad():
                    m.weight.normal_(1.0, 0.02, generator=generator)
                    m.bias.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        v = self.net(self.fc(z).view(-1, 256, 4, 4))
        u = (v + 1) / 2
        if tuple(u.shape[-2:]) != tuple(self.size):
            u = F.interpolate(u, size=self.size, mode="bilinear", align_corners=False)
        return u


def _state_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class FragileKey:
    images: torch.Tensor  # (n, C, H, W): uint8, or float32 in [0, 1]
    key: torch.Tensor  # (n,) reference labels on the model they were generated against
    stats: dict[str, Any]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.images.contiguous().numpy().tobytes() + self.key.numpy().astype(np.int64).tobytes()).hexdigest()

    def as_float(self) -> torch.Tensor:
        return self.images.float() / 255.0 if self.images.dtype == torch.uint8 else self.images


def _probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(x), dim=1)


def trigger_stats(probs: torch.Tensor, key: torch.Tensor) -> dict[str, Any]:
    """AccTri against ``key``, flatness (mean top-1 probability, classes with p >= 0.1) and log-prob margins."""
    logp = torch.log(probs.clamp_min(1e-30))
    top2 = logp.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    return {
        "acctri": float((probs.argmax(1) == key).float().mean()),
        "mean_top1_probability": float(probs.max(1).values.mean()),
        "mean_classes_above_0_1": float((probs >= 0.1).sum(1).float().mean()),
        "margin_min": float(margin.min()),
        "margin_median": float(margin.median()),
    }


STALL_STEPS = 500  # generator steps without a new trigger reaching its key before refinement takes over


class _Watch:
    """fit hook for the generator: from step ``cfg.steps`` on, every 100 steps count the stored triggers that carry
    their key, and stop when all do, or (refinement on) after STALL_STEPS steps without a new one."""

    def __init__(self, cfg: FragileConfig, hits, quiet: bool | None):
        self.cfg, self.hits, self.quiet = cfg, hits, quiet
        self.best, self.best_at = -1, 0

    def on_step_end(self, state) -> None:
        cfg, done = self.cfg, state.step
        if done < cfg.steps or (done - cfg.steps) % 100 or done >= cfg.step_limit:
            return
        hits = self.hits()
        if hits > self.best:
            self.best, self.best_at = hits, done
        if cfg.variant == "var" or hits == cfg.n or (cfg.refine_steps > 0 and done - self.best_at >= STALL_STEPS):
            state.stop = True
        else:
            log(f"fragile generator: {hits}/{cfg.n} triggers carry their key after {done} steps; continuing", quiet=self.quiet)


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[str]:
    """The classifier in eval mode with no parameter gradients (a MagicGuard model's ripple bypassed for the owner's
    gradients), restored afterwards; yields its state hash and raises if that changed."""
    before, was_training = _state_sha256(model), model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with owner_gradients(model):
            yield before
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    if _state_sha256(model) != before:
        raise CheckFailed("generating fragile triggers changed the classifier's state; nothing was written")


def _train_generator(model: nn.Module, input_shape: tuple[int, int, int], key: torch.Tensor, cfg: FragileConfig,
                     a: float, gamma: float, quiet: bool | None) -> tuple[torch.Tensor, int]:
    """Train G (the one training loop, one full-batch step per "epoch") and return the stored triggers and the
    steps taken.  The loss is CE(P, s) + a·Var(P), plus the margin floor past ``cfg.steps``; uint8 rounding is
    straight-through from 80% of ``cfg.steps`` on."""
    g = torch.Generator().manual_seed(cfg.seed)
    z = torch.randn(cfg.n, cfg.latent, generator=g)
    gen = Generator(cfg.latent, input_shape[0], tuple(input_shape[1:]))
    gen.init_weights(g)

    def step(state, x, y) -> torch.Tensor:
        u = gen(z)
        if cfg.uint8 and state.step >= 0.8 * cfg.steps:  # straight-through rounding to the stored uint8 grid
            u = u + (torch.round(u * 255) / 255 - u).detach()
        logits = model(u)
        p = torch.softmax(logits, dim=1)
        if cfg.variant == "var":
            return a * row_variance(p)
        loss = F.cross_entropy(logits, key) + a * row_variance(p)
        if cfg.floor > 0 and state.step >= cfg.steps:  # fallback margin floor (docs/fragile.md): b * mean relu(gamma - m_i)
            loss = loss + cfg.floor * F.relu(gamma - _margins(logits, key)).mean()
        return loss

    def stored() -> torch.Tensor:
        gen.train()  # BatchNorm over the full latent batch, as during training (docs/fragile.md)
        with torch.no_grad():
            u = gen(z).clamp(0, 1)
        return torch.round(u * 255).to(torch.uint8) if cfg.uint8 else u

    if cfg.variant == "non":
        return stored(), 0
    hits = lambda: int((_probs(model, _as_float(stored(), cfg)).argmax(1) == key).sum())  # noqa: E731
    epochs = cfg.steps if cfg.variant == "var" else cfg.step_limit
    res = fit(gen, TensorData(torch.zeros(1), torch.zeros(1)),
              TrainConfig(epochs=epochs, batch_size=1, optimizer="adam", lr=cfg.lr, weight_decay=0.0, schedule="none",
                          seed=cfg.seed), step=step, hooks=[_Watch(cfg, hits, quiet)], desc="fragile generator",
              quiet=quiet)
    return stored(), res.steps


def _as_float(imgs: torch.Tensor, cfg: FragileConfig) -> torch.Tensor:
    return imgs.float() / 255 if cfg.uint8 else imgs


def generate(model: nn.Module, input_shape: tuple[int, int, int], num_classes: int, cfg: FragileConfig | None = None,
             *, quiet: bool | None = True) -> FragileKey:
    """Train the generator against the frozen ``model`` and return the trigger images with their reference labels.

    ``model`` is left bit-identical (checked).  For the ``non`` and ``var`` variants the reference labels are the
    model's own predictions (as in the paper); otherwise the secret key ``i mod M``."""

    cfg = cfg or FragileConfig()
    if num_classes < 2:
        raise BadInput("fragile triggers need a classifier with at least 2 classes")
    key = secret_key(cfg.n, num_classes)
    a = cfg.weight(num_classes)
    gamma = cfg.floor_margin if cfg.floor_margin is not None else cfg.margin / 2
    refined: dict[str, Any] = {"triggers": 0, "steps": 0, "restarted": 0}
    with _frozen(model) as before:
        imgs, total = _train_generator(model, input_shape, key, cfg, a, gamma, quiet)
        if cfg.variant not in ("non", "var") and cfg.refine_steps > 0:
            imgs, refined = _refine(model, imgs, key, cfg, a, gamma, quiet=quiet)
        probs = _probs(model, _as_float(imgs, cfg))
    secret = key
    if cfg.variant in ("non", "var"):
        key = probs.argmax(1)
    key, rekeyed = _rekey(probs, key, cfg, quiet)
    stats = {**trigger_stats(probs, key), "steps": total, "a": a, "variant": cfg.variant, "model_sha256": before,
             "margin_floor_used": bool(cfg.floor > 0 and total > cfg.steps and cfg.variant not in ("non", "var")),
             "refined": refined, "rekeyed": rekeyed,
             "secret_key_agreement": float((key == secret).float().mean())}
    if stats["acctri"] < 1.0:
        raise CheckFailed(f"the generator reached AccTri {stats['acctri']:.2f} < 1.0 on the model after {total} steps "
                          f"and {refined['steps']} refinement steps (at most {cfg.max_rekeyed:.0%} may keep the "
                          "model's own label); raise max_steps or refine_steps, or change the seed. Nothing was written")
    return FragileKey(imgs, key, stats)


def _rekey(probs: torch.Tensor, key: torch.Tensor, cfg: FragileConfig, quiet: bool | None) -> tuple[torch.Tensor, list[int]]:
    """A key class this graph cannot reach from the triggers: up to ``max_rekeyed`` of them keep the model's label."""
    miss = torch.nonzero(probs.argmax(1) != key).flatten()
    if cfg.refine_steps == 0 or not 0 < len(miss) <= math.floor(cfg.max_rekeyed * cfg.n):
        return key, []
    key = key.clone()
    key[miss] = probs.argmax(1)[miss]
    log(f"fragile generator: {len(miss)}/{cfg.n} triggers could not reach their key class; they keep the model's "
        "own label", quiet=quiet)
    return key, miss.tolist()


def boost(model: nn.Module, key: FragileKey, idx: list[int], num_classes: int, cfg: FragileConfig, factor: float,
          *, quiet: bool | None = True) -> FragileKey:
    """Refine the triggers ``idx`` (those an enrolment dropped) on ``model`` until each has ``factor / 2`` times the
    largest margin among them (at least the floor margin gamma); the others stay bit-identical.  The margin an
    enrolment measures is the artifact's, after its defense head and runtime: a flat trigger that clears gamma on the
    differentiable copy can sit within the artifact's floor (a fused heuristic head compresses flat outputs)."""
    gamma0 = cfg.floor_margin if cfg.floor_margin is not None else cfg.margin / 2
    i = torch.as_tensor(idx, dtype=torch.long)
    x = key.as_float()[i]
    with _frozen(model):
        with torch.no_grad():
            m0 = _margins(model(x), key.key[i])
        gamma = factor * max(float(m0.max()), gamma0)  # the search stops once every margin is >= gamma / 2
        xs, ms, steps = _pixel_search(model, x, key.key[i], cfg, cfg.weight(num_classes), gamma)
        better = ms > m0  # a trigger the search could not improve keeps its image
        images = key.images.clone()
        new = torch.round(xs * 255).to(torch.uint8) if cfg.uint8 else xs
        images[i[better]] = new[better]
        probs = _probs(model, images.float() / 255 if cfg.uint8 else images)
    log(f"fragile: {len(idx)} triggers did not enrol; refined {int(better.sum())} of them towards a margin of "
        f"{gamma / 2:.3g} on the differentiable copy in {steps} steps", quiet=quiet)
    rounds = [*key.stats.get("boosted", []), {"triggers": len(idx), "improved": int(better.sum()), "steps": steps,
                                                "target_margin": gamma / 2}]
    return FragileKey(images, key.key, {**key.stats, **trigger_stats(probs, key.key), "boosted": rounds})
