"""Fragile triggers (Yin, Yin & Zhang, ICIP 2022): detect any modification of a deployed model, zero false alarms.

Method and measurements: docs/fragile.md (Yin et al., ICIP 2022).  A small generator G maps n fixed latents to n trigger images, trained
(through the one training loop) so that the frozen classifier C labels trigger i as ``s_i = i mod M`` while its
softmax on every trigger is as flat as possible (``L = CE(P, s) + a·Var(P)``): the triggers sit next to several
decision boundaries, so almost any change of C flips some of them.  C is never modified (checked by hash).

Generation needs a differentiable copy of the deployed computation (spec 9.3 step 1): the float model of a bundle,
or, for an ``.onnx`` artifact and an INT8 bundle, the artifact's own graph run in PyTorch with its Q/DQ nodes as
fake-quant (straight-through gradient; :mod:`edgeguard.runtime.onnx_torch`).

Deployed artifacts compute slightly different numbers (ONNX Runtime, INT8, TensorRT), so triggers are *enrolled*
per artifact (spec 9.3): run R times at each batch size through the artifact's Runner, drop unstable triggers and
near-ties (log-probability margin below ``max(4·noise, tau)``), and keep the artifact's own labels as the reference.
Verification is then exact on labels: intact iff every kept trigger returns its reference label, and (the Runner
returns probabilities) every log-probability stays within ``3·noise + eps`` of the enrolled one.

Choice of ``a`` (measured on the digits CNN, see docs/fragile.md): the paper's a = 200 (CIFAR-10, ResNet-18) leaves a small CNN
that *can* equalise the nine other classes at the analytic optimum of L -- key probability 0.208, others 0.088, a
log-probability margin of 0.86 -- so one epoch of last-layer fine-tuning flipped no label.  The default therefore sets
``a`` from a target margin ``m`` at that optimum: with p = e^m / (e^m + M - 1) the key probability,
``a = M(M-1) / (2 p (M p - 1))`` (m = 0.2 gives a = 1931 for M = 10).  ``a`` can still be given directly.

When some triggers still miss their key after ``steps`` (a classifier whose flat regions favour other classes; the
3-channel gratings model reached only 14/100 at a = 1932 and 89/100 at a = 200), training continues with the spec's
margin floor ``b · mean relu(gamma - m_i)`` (b = 50, gamma = margin/2).  It is a fallback only: switched on from the
start it made digits triggers robust to last-layer fine-tuning (AccTri stayed 1.0 where it fell to 0.10 without).
When the shared generator stalls anyway, the triggers it left behind get their pixels optimised one by one
(:func:`_refine`); the others are kept as the generator made them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeguard.bundle import VAULT, Vault, load_bundle
from edgeguard.config import Config, require
from edgeguard.errors import BadInput, CheckFailed
from edgeguard.fileio import sha256_file
from edgeguard.models.guard import owner_gradients
from edgeguard.progress import log
from edgeguard.runtime import artifact_kind, open_runner
from edgeguard.runtime.onnx_torch import differentiable_copy
from edgeguard.training import TensorData, TrainConfig, fit

VARIANTS = ("full", "cla", "var", "non")  # CE + a*Var, CE only, Var only, untrained generator (spec 5)


@dataclass(frozen=True)
class FragileConfig(Config):
    n: int = 100
    a: float | None = None  # weight of Var(P); default: from ``margin`` (a_for_margin)
    margin: float = 0.2  # target log-probability margin of the key class at the optimum of L (sets a when a is None)
    latent: int = 512
    steps: int = 300  # full-batch generator steps ("epochs" in the paper)
    max_steps: int | None = None  # keep training in chunks of 100 steps until AccTri on C is 1.0; default max(3000, steps)
    lr: float = 1e-3
    floor: float = 50.0  # b: margin floor b * mean relu(gamma - m_i) (spec 9.3), only in steps past ``steps`` (fallback)
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
    """s_i = i mod M (spec F1)."""
    return torch.arange(n) % num_classes


def row_variance(p: torch.Tensor) -> torch.Tensor:
    """Var(P): per-row variance over classes around 1/M, averaged over rows (= torch.var(P, unbiased=False))."""
    return ((p - 1.0 / p.shape[1]) ** 2).mean()


class Generator(nn.Module):
    """DCGAN-style generator for 32x32 (spec 4): 512 -> 256x4x4 -> 128x8x8 -> 64x16x16 -> Cx32x32, pixels in [0, 1];
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


STALL_STEPS = 1500  # generator steps without a new trigger reaching its key before refinement takes over (at 500 one VGG
# graph was cut at 800 steps with AccTri 0.10: its progress comes in late jumps)


def _margins(logits: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Logit (= log-probability) margin of the key class over its strongest rival; negative when it is not top-1."""
    rival = logits.masked_fill(F.one_hot(key, logits.shape[1]).bool(), float("-inf")).max(1).values
    return logits.gather(1, key[:, None])[:, 0] - rival


def _pixel_search(model: nn.Module, start: torch.Tensor, k: torch.Tensor, cfg: FragileConfig, a: float, gamma: float,
                  *, latest: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Adam on per-trigger pixels ``sigmoid(w)`` (straight-through uint8 rounding) from ``start`` towards keys ``k``;
    each trigger keeps the latest (``latest``; else the first) image seen on the stored grid with a margin >=
    gamma/2, else its best-margin one (``start`` included).  Returns images, margins
    and the steps taken (it stops once every margin is >= gamma/2)."""
    w = torch.logit(start.clamp(0.5 / 255, 1 - 0.5 / 255)).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=cfg.refine_lr)
    b = cfg.floor if cfg.floor > 0 else 50.0

    def grid() -> torch.Tensor:
        u = torch.sigmoid(w)
        return u + (torch.round(u * 255) / 255 - u).detach() if cfg.uint8 else u

    with torch.no_grad():
        best_x = grid().detach().clone()
        best_m = _margins(model(best_x), k)
    steps = 0
    for steps in range(1, cfg.refine_steps + 1):
        if bool((best_m >= gamma / 2).all()):
            break
        logits = model(grid())
        loss = (F.cross_entropy(logits, k) + a * row_variance(torch.softmax(logits, 1))
                + b * F.relu(gamma - _margins(logits, k)).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if steps % 10 == 0:
            with torch.no_grad():
                x = grid()
                m = _margins(model(x), k)
                # with a·Var the latest image past gamma/2 is the flattest; without, the first is the nearest a tie
                better = ((m >= gamma / 2) & ((best_m < gamma / 2) | latest)) | ((best_m < gamma / 2) & (m > best_m))
                best_x[better], best_m[better] = x[better], m[better]
    return best_x, best_m, steps


def _refine(model: nn.Module, imgs: torch.Tensor, key: torch.Tensor, cfg: FragileConfig, a: float, gamma: float,
            *, quiet: bool | None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Optimise the pixels of the triggers that miss their key (or sit within gamma/4 of a tie) one by one.

    A shared generator over a batch of latents can stall with a few triggers on the wrong side of a boundary;
    per-trigger pixels have no such coupling.  Loss per trigger: CE + a·Var + b·relu(gamma - m)
    (:func:`_pixel_search`); no trigger ends with a smaller margin than it came with.

    A graph whose INT8 fake-quant maps inputs onto a coarse lattice of outputs (an imported VGG behind QAT and a
    fused defense: margins in steps of about 0.05, the straight-through gradient blind to them) can leave a
    trigger stuck where it started, held in the flat region by a·Var.  Those still off their key get a second
    search without the Var term (CE and the floor only), started from the trigger (any key) nearest to their key
    class plus uint8 noise of +-2 levels (counted as ``restarted``); it stops as soon as the margin reaches
    gamma/2, so these triggers too end next to a boundary.  The triggers that were right from the start are left
    bit-identical."""

    x0 = imgs.float() / 255 if cfg.uint8 else imgs.clone()
    with torch.no_grad():
        m0 = _margins(model(x0), key)
    todo = torch.nonzero(m0 < gamma / 4).flatten()
    if len(todo) == 0:
        return imgs, {"triggers": 0, "steps": 0, "restarted": 0}
    log(f"fragile generator: refining the pixels of {len(todo)}/{len(key)} triggers (min margin {float(m0.min()):.3g})",
        quiet=quiet)
    x, margins = x0.clone(), m0.clone()
    x[todo], margins[todo], steps = _pixel_search(model, x0[todo], key[todo], cfg, a, gamma)
    stuck = todo[margins[todo] <= 0]
    if len(stuck):
        noise = torch.Generator().manual_seed(cfg.seed + 1)
        with torch.no_grad():
            logits = model(x)
            starts = []
            for i in stuck.tolist():
                near = _margins(logits, torch.full((len(x),), int(key[i])))
                near[i] = float("-inf")
                j = int(near.argmax())
                jitter = torch.randint(-2, 3, x[j].shape, generator=noise).float() / 255
                starts.append((x[j] + jitter).clamp(0, 1))
        log(f"fragile generator: {len(stuck)} triggers still off their key; restarting them from the nearest trigger",
            quiet=quiet)
        xs, ms, more = _pixel_search(model, torch.stack(starts), key[stuck], cfg, 0.0, gamma, latest=False)
        gain = ms > margins[stuck]  # a restart that does worse than where the trigger was is dropped
        x[stuck[gain]], margins[stuck[gain]] = xs[gain], ms[gain]
        steps += more
    out = imgs.clone()
    out[todo] = torch.round(x[todo] * 255).to(torch.uint8) if cfg.uint8 else x[todo]
    return out, {"triggers": int(len(todo)), "steps": steps, "restarted": int(len(stuck))}


def generate(model: nn.Module, input_shape: tuple[int, int, int], num_classes: int, cfg: FragileConfig | None = None,
             *, quiet: bool | None = True) -> FragileKey:
    """Train the generator against the frozen ``model`` and return the trigger images with their reference labels.

    ``model`` is left bit-identical (checked).  For the ``non`` and ``var`` variants the reference labels are the
    model's own predictions (as in the paper); otherwise the secret key ``i mod M``."""

    cfg = cfg or FragileConfig()
    if num_classes < 2:
        raise BadInput("fragile triggers need a classifier with at least 2 classes")
    before = _state_sha256(model)
    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(cfg.seed)
    z = torch.randn(cfg.n, cfg.latent, generator=g)
    gen = Generator(cfg.latent, input_shape[0], tuple(input_shape[1:]))
    gen.init_weights(g)
    key = secret_key(cfg.n, num_classes)
    a = cfg.weight(num_classes)
    gamma = cfg.floor_margin if cfg.floor_margin is not None else cfg.margin / 2
    total = 0
    refined: dict[str, Any] = {"triggers": 0, "steps": 0, "restarted": 0}

    def images(train_round: bool) -> torch.Tensor:
        u = gen(z)
        if cfg.uint8 and train_round:  # straight-through rounding to the stored uint8 grid
            u = u + (torch.round(u * 255) / 255 - u).detach()
        return u

    def step(state, x, y) -> torch.Tensor:
        done = total + state.step  # steps before this fit call (extension chunks) plus this call's
        u = images(done >= 0.8 * cfg.steps)
        logits = model(u)
        p = torch.softmax(logits, dim=1)
        if cfg.variant == "var":
            return a * row_variance(p)
        loss = F.cross_entropy(logits, key) + a * row_variance(p)
        if cfg.floor > 0 and done >= cfg.steps:  # fallback margin floor (spec 9.3): b * mean relu(gamma - m_i)
            loss = loss + cfg.floor * F.relu(gamma - _margins(logits, key)).mean()
        return loss

    def stored() -> torch.Tensor:
        gen.train()  # BatchNorm over the full latent batch, as during training (spec 4)
        with torch.no_grad():
            u = gen(z).clamp(0, 1)
        return torch.round(u * 255).to(torch.uint8) if cfg.uint8 else u

    try:
        with owner_gradients(model):  # a MagicGuard model: the owner's gradients bypass the ripple
            if cfg.variant != "non":
                dummy = TensorData(torch.zeros(1), torch.zeros(1))
                chunk, best, best_at = cfg.steps, -1, 0
                while True:
                    fit(gen, dummy, TrainConfig(epochs=chunk, batch_size=1, optimizer="adam", lr=cfg.lr, weight_decay=0.0,
                                                schedule="none", seed=cfg.seed + total), step=step,
                        desc="fragile generator", quiet=quiet)
                    total += chunk
                    imgs = stored()
                    x = imgs.float() / 255 if cfg.uint8 else imgs
                    hits = int((_probs(model, x).argmax(1) == key).sum())
                    if hits > best:
                        best, best_at = hits, total
                    stalled = cfg.refine_steps > 0 and total - best_at >= STALL_STEPS
                    if cfg.variant == "var" or hits == cfg.n or total >= cfg.step_limit or stalled:
                        break
                    log(f"fragile generator: {hits}/{cfg.n} triggers carry their key after {total} steps; continuing",
                        quiet=quiet)
                    chunk = min(100, cfg.step_limit - total)
            imgs = stored()
            if cfg.variant not in ("non", "var") and cfg.refine_steps > 0:
                imgs, refined = _refine(model, imgs, key, cfg, a, gamma, quiet=quiet)
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    if _state_sha256(model) != before:
        raise CheckFailed("generating fragile triggers changed the classifier's state; nothing was written")
    x = imgs.float() / 255 if cfg.uint8 else imgs
    probs = _probs(model.eval(), x)
    secret = key
    if cfg.variant in ("non", "var"):
        key = probs.argmax(1)
    miss, rekeyed = torch.nonzero(probs.argmax(1) != key).flatten(), []
    if cfg.refine_steps > 0 and 0 < len(miss) <= math.floor(cfg.max_rekeyed * cfg.n):
        key = key.clone()  # a key class this graph cannot reach from the triggers: they keep the model's own label
        key[miss] = probs.argmax(1)[miss]
        rekeyed = miss.tolist()
        log(f"fragile generator: {len(miss)}/{cfg.n} triggers could not reach their key class; they keep the model's "
            "own label", quiet=quiet)
    stats = {**trigger_stats(probs, key), "steps": total, "a": a, "variant": cfg.variant, "model_sha256": before,
             "margin_floor_used": bool(cfg.floor > 0 and total > cfg.steps and cfg.variant not in ("non", "var")),
             "refined": refined, "rekeyed": rekeyed,
             "secret_key_agreement": float((key == secret).float().mean())}
    if stats["acctri"] < 1.0:
        raise CheckFailed(f"the generator reached AccTri {stats['acctri']:.2f} < 1.0 on the model after {total} steps "
                          f"and {refined['steps']} refinement steps (at most {cfg.max_rekeyed:.0%} may keep the "
                          "model's own label); raise max_steps or refine_steps, or change the seed. Nothing was written")
    return FragileKey(imgs, key, stats)


# --- enrolment and verification on an artifact ----------------------------------------------------------

RECORD_FORMAT = "edgeguard-fragile"
FOLDER = "fragile"  # inside the owner vault: VAULT/fragile


@dataclass(frozen=True)
class EnrolConfig(Config):
    repeats: int = 10
    batch_sizes: tuple[int, ...] = (1, 100)
    min_kept: float = 0.9  # share of triggers that must survive the stability and margin filters

    def __post_init__(self) -> None:
        require(self.repeats >= 1 and len(self.batch_sizes) >= 1 and all(int(b) >= 1 for b in self.batch_sizes),
                "enrolment needs repeats >= 1 and batch sizes >= 1")
        require(0 < self.min_kept <= 1, "min_kept must lie in (0, 1]")


def _tau(precision: str) -> float:
    return 1e-3 if precision == "fp32" else 1e-2


def _eps(precision: str) -> float:
    return 1e-5 if precision == "fp32" else 1e-3


def _logp(runner, x: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    p = runner.predict(x, batch_size=batch_size) if batch_size else runner.predict(x)
    return np.log(np.clip(p.astype(np.float64), 1e-30, None))


def _numerics(info) -> dict[str, Any]:
    """What makes two runs of the same weights compute different numbers: backend, precision, device."""
    return {"backend": info.backend, "precision": info.precision, "device": info.device}


def record_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def enrol(runner, key: FragileKey, cfg: EnrolConfig | None = None, *, generation: dict[str, Any] | None = None) -> dict[str, Any]:
    """The artifact's reference record: fingerprint, kept triggers, their labels and log-probabilities, noise floor.

    The record carries ``record_sha256`` over its own content, so an edited record is refused at verification."""
    cfg = cfg or EnrolConfig()
    info = runner.info
    x = key.images.numpy()
    runs = np.stack([_logp(runner, x, b) for b in cfg.batch_sizes for _ in range(cfg.repeats)])
    med = np.median(runs, axis=0)
    delta = float(np.abs(runs - med).max())
    labels = runs.argmax(2)
    stable = (labels == labels[0]).all(0)
    top2 = np.sort(med, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    floor = max(4 * delta, _tau(info.precision))
    kept = np.flatnonzero(stable & (margin >= floor))
    if len(kept) < math.ceil(cfg.min_kept * len(x)):
        raise CheckFailed(f"only {len(kept)}/{len(x)} triggers are stable with a margin >= {floor:.2g} on {info.path} "
                          f"(need {cfg.min_kept:.0%}); regenerate with a smaller --margin or more triggers. Nothing was written")
    ref = med.argmax(1)
    record = {
        "format": RECORD_FORMAT,
        "version": 1,
        "fingerprint": {"sha256": info.sha256, **_numerics(info), "defense": info.defense,
                        "classes": list(info.classes), "input_shape": list(info.input_shape), "path": info.path},
        "trigger_sha256": key.sha256,
        "n": len(x),
        "kept": kept.tolist(),
        "reference_labels": ref[kept].tolist(),
        "reference_logprobs": med[kept].round(7).tolist(),
        "key_agreement": round(float((ref[kept] == key.key.numpy()[kept]).mean()), 6),
        "noise": delta,
        "margin_floor": floor,
        "margin_min": float(margin[kept].min()),
        "margin_median": float(np.median(margin[kept])),
        "tolerance": 3 * delta + _eps(info.precision),
        "enrol": cfg.params(),
        "generation": generation or dict(key.stats),
    }
    record["record_sha256"] = record_hash(record)
    return record


@dataclass(frozen=True)
class FragileVerification:
    artifact: dict[str, Any]
    verdict: str  # intact | modified | drift
    hash_matches: bool
    acc_tri: float  # against the enrolled reference labels, on the kept triggers
    acc_tri_key: float  # against the stored key: i mod M, bar any rekeyed triggers (information)
    kept: int
    flipped: tuple[int, ...]  # trigger indices whose label changed
    max_deviation: float  # max |log p - reference| over kept triggers
    tolerance: float
    enrolled: dict[str, Any]  # the fingerprint of the enrolment compared against
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.verdict == "intact"

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "flipped": list(self.flipped), "passed": self.passed}

    def summary(self) -> str:
        first = f"{self.note}; " if self.note else ""
        flips = (f", flipped triggers {list(self.flipped[:10])}{' ...' if len(self.flipped) > 10 else ''}"
                 if self.flipped else "")
        return (f"fragile {self.verdict.upper()}: {first}AccTri {self.acc_tri:.3f} on {self.kept} enrolled triggers{flips}, "
                f"max |Δlog p| {self.max_deviation:.2g} (tolerance {self.tolerance:.2g})")


def check_record(record: Any, where: str = "the fragile enrolment") -> dict[str, Any]:
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise BadInput(f"{where} is not an edgeguard fragile record")
    if record.get("record_sha256") != record_hash(record):
        raise BadInput(f"{where} was edited after enrolment (its record hash does not match); refusing to use it")
    return record


def verify(runner, record: dict[str, Any], key: FragileKey) -> FragileVerification:
    """Run the kept triggers on ``runner`` and compare with ``record`` (labels exactly, log-probabilities within the
    enrolled tolerance).  A different file hash is reported first (and is a modification); a record enrolled on other
    numerics (backend, precision or device) gives ``drift``, never ``modified``."""
    check_record(record)
    if key.sha256 != record["trigger_sha256"]:
        raise BadInput("the fragile triggers do not match the enrolment record (sha256); the vault was modified")
    info = runner.info
    fp = record["fingerprint"]
    if list(info.classes) != fp["classes"] or [d for d in info.input_shape if d] != [d for d in fp["input_shape"] if d]:
        raise BadInput(f"{info.path} is a {info.num_classes}-class model taking {list(info.input_shape)}; the fragile "
                       f"enrolment is for a {len(fp['classes'])}-class model taking {fp['input_shape']}")
    kept = np.asarray(record["kept"], dtype=np.int64)
    runner.expect(len(kept))
    logp = _logp(runner, key.images.numpy()[kept])
    ref = np.asarray(record["reference_labels"])
    got = logp.argmax(1)
    flipped = tuple(int(i) for i in kept[got != ref])
    dev = float(np.abs(logp - np.asarray(record["reference_logprobs"])).max())
    same_hash = info.sha256 == fp["sha256"]
    same_numerics = _numerics(info) == {k: fp[k] for k in ("backend", "precision", "device")}
    changed = bool(flipped) or dev > record["tolerance"]
    notes = []
    if not same_hash:
        notes.append(f"the artifact's sha256 {info.sha256[:12]} differs from the enrolled {fp['sha256'][:12]}")
    if not same_numerics:
        verdict = "drift"
        notes.append(f"enrolled on {fp['backend']} {fp['precision']} ({fp['device']}), run on {info.backend} "
                     f"{info.precision} ({info.device}): differences are deployment drift, not evidence of tampering; "
                     "enrol this artifact to check its integrity")
    elif not same_hash or changed:
        verdict = "modified"
        if not same_hash and not changed:
            notes.append("no enrolled trigger changed: the edit does not show in the outputs (metadata, or below the "
                         "artifact's precision)")
        elif same_hash:
            notes.append("the file is the enrolled one but its outputs changed: the runtime or its environment changed")
    else:
        verdict = "intact"
    key_labels = key.key.numpy()[kept]
    return FragileVerification(info.to_json(), verdict, same_hash, round(1 - len(flipped) / len(kept), 6),
                               round(float((got == key_labels).mean()), 6), len(kept), flipped, dev,
                               record["tolerance"], {k: fp[k] for k in ("sha256", "backend", "precision", "device", "path")},
                               "; ".join(notes))


# --- the owner's store: VAULT/fragile -------------------------------------------------------------------


class FragileStore:
    """Trigger sets and per-artifact enrolments in a :class:`~edgeguard.bundle.Vault` folder (hashed index).

    ``key-<sha12>``: the trigger images (exact dtype) and their labels; ``enrol-<sha12>``: one record per enrolled
    artifact (by the artifact's sha256), each hashed over its own content."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.vault = Vault(self.path)

    @classmethod
    def find(cls, vault: str | Path) -> FragileStore | None:
        """The fragile store of an owner vault (``VAULT/fragile``), or ``vault`` itself when it is one."""
        p = Path(vault)
        for cand in (p / FOLDER, p):
            store = cls(cand)
            if (cand / store.vault.INDEX).is_file() and store.records():
                return store
        return None

    def put_key(self, key: FragileKey) -> str:
        name = f"key-{key.sha256[:12]}"
        if name not in self.vault:
            self.vault.put_tensors(name, {"images": key.images, "key": key.key})
        return name

    def get_key(self, sha256: str) -> FragileKey:
        t = self.vault.get_tensors(f"key-{sha256[:12]}")
        if set(t) != {"images", "key"}:
            raise BadInput(f"the fragile key {sha256[:12]} in {self.path} is not a trigger set")
        key = FragileKey(t["images"], t["key"], {})
        if key.sha256 != sha256:
            raise BadInput(f"the fragile key {sha256[:12]} in {self.path} does not hash to its name; the vault was modified")
        return key

    def put_record(self, record: dict[str, Any]) -> str:
        name = f"enrol-{record['fingerprint']['sha256'][:12]}"
        self.vault.put_json(name, record)
        return name

    def records(self) -> list[dict[str, Any]]:
        return [check_record(self.vault.get_json(n), f"{self.path}/{n}.json")
                for n in self.vault.names() if n.startswith("enrol-")]

    def select(self, info) -> dict[str, Any]:
        """The enrolment to verify ``info`` against: the same file, else one with the same numerics, else any one
        for the same classes and input (drift)."""
        records = self.records()
        if not records:
            raise BadInput(f"{self.path} holds no fragile enrolment")
        for r in records:
            if r["fingerprint"]["sha256"] == info.sha256:
                return r
        fits = [r for r in records if r["fingerprint"]["classes"] == list(info.classes)]
        if not fits:
            fp = records[0]["fingerprint"]
            raise BadInput(f"the fragile enrolments in {self.path} are for a {len(fp['classes'])}-class model, not for "
                           f"{info.path} ({info.num_classes} classes); pass the vault of this model")
        same = [r for r in fits if {k: r["fingerprint"][k] for k in ("backend", "precision", "device")} == _numerics(info)]
        return (same or fits)[-1]


def verify_store(runner, store: FragileStore) -> FragileVerification:
    record = store.select(runner.info)
    return verify(runner, record, store.get_key(record["trigger_sha256"]))


# --- the protection command -----------------------------------------------------------------------------


def surrogate_for(artifact: str | Path, surrogate: str | Path | None = None) -> tuple[nn.Module, str]:
    """The differentiable model the generator trains against, and a description of it: ``surrogate`` when given,
    else the artifact itself -- a float bundle's model, an INT8 bundle's QDQ graph, an ONNX graph (fake-quant)."""

    src = Path(surrogate) if surrogate is not None else Path(artifact)
    kind = artifact_kind(src)
    if kind == "bundle":
        b = load_bundle(src)
        if b.quantized:
            return differentiable_copy(src / "model.onnx"), f"{src} (INT8 QDQ graph, fake-quant)"
        return b.load_model(), f"{src} (float model)"
    if kind == ".onnx":
        return differentiable_copy(src), f"{src} (ONNX graph{', fake-quant' if _is_qdq(src) else ''})"
    raise BadInput(f"{src} cannot be differentiated ({kind}): pass --surrogate with the bundle or the .onnx it was built from")


def _is_qdq(path: Path) -> bool:
    import onnx

    return any(n.op_type == "QuantizeLinear" for n in onnx.load(str(path), load_external_data=False).graph.node)


@dataclass(frozen=True)
class FragileResult:
    store: str
    artifact: dict[str, Any]
    surrogate: str
    trigger_sha256: str
    generation: dict[str, Any]
    kept: int
    n: int
    key_agreement: float
    noise: float
    margin_floor: float
    margin_min: float
    check: FragileVerification
    passed: bool = True

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "check"}
        d["check"] = self.check.to_json()
        return d


def protect_fragile(artifact: str | Path, out: str | Path | None = None, cfg: FragileConfig | None = None,
                    enrol_cfg: EnrolConfig | None = None, *, surrogate: str | Path | None = None,
                    key_sha256: str | None = None, device: str | None = None, quiet: bool | None = None) -> FragileResult:
    """Generate triggers against the artifact's differentiable copy (or reuse a stored key), enrol them on the
    artifact through its Runner, check once, and write key + record to ``out`` (default ``BUNDLE/vault/fragile``)."""

    cfg = cfg or FragileConfig()
    kind = artifact_kind(artifact)
    if out is None:
        if kind != "bundle":
            raise BadInput(f"enrolling {artifact} needs --out VAULT/fragile (the owner's vault, never shipped)")
        out = Path(artifact) / VAULT / FOLDER
    store = FragileStore(out)
    with open_runner(artifact, device=device) as runner:
        info = runner.info
        file_hash = sha256_file(artifact) if kind != "bundle" else info.sha256
        if key_sha256 is not None:
            names = [n for n in store.vault.names() if n.startswith(f"key-{key_sha256[:12]}")]
            if not names:
                raise BadInput(f"{out} has no fragile key {key_sha256[:12]}")
            key = store.get_key(_key_sha(store, names[0]))
            generation = {"reused_key": key.sha256}
            described = "(stored key)"
        else:
            model, described = surrogate_for(artifact, surrogate)
            log(f"fragile: generating {cfg.n} triggers against {described} (a = {cfg.weight(info.num_classes):.4g})",
                quiet=quiet)
            shape = tuple(int(d) for d in info.input_shape) if all(info.input_shape) else None
            if shape is None:
                raise BadInput(f"{artifact} has a dynamic input size; fragile triggers need a fixed C x H x W")
            key = generate(model, shape, info.num_classes, cfg, quiet=quiet)
            generation = {**key.stats, "config": cfg.params(), "surrogate": described}
        record = enrol(runner, key, enrol_cfg, generation=generation)
        check = verify(runner, record, key)
    if check.verdict != "intact":
        raise CheckFailed(f"the enrolled triggers did not re-verify on {artifact} ({check.verdict}); nothing was written")
    after = sha256_file(artifact) if kind != "bundle" else info.sha256
    if after != file_hash:
        raise CheckFailed(f"{artifact} changed during enrolment; nothing was written")
    store.put_key(key)
    store.put_record(record)
    return FragileResult(str(store.path), info.to_json(), described, key.sha256, generation, len(record["kept"]),
                         record["n"], record["key_agreement"], record["noise"], record["margin_floor"],
                         record["margin_min"], check)


def _key_sha(store: FragileStore, name: str) -> str:
    t = store.vault.get_tensors(name)
    return FragileKey(t["images"], t["key"], {}).sha256
