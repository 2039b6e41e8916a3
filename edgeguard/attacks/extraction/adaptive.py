"""Adaptive extraction attacks (docs/extraction.md) on top of KnockoffNets' transfer set.

Each is its own registered method; all query a random sample of the attacker's pool (KnockoffNets' random policy)
through the budgeted oracle and differ in what they do with the answers:

- ``knockoff_top1``: train on one-hot(argmax y') (a label-only attacker).
- ``knockoff_s4l``: soft cross-entropy on the transfer set plus ``rotation_weight`` x a 4-way rotation loss
  (0/90/180/270 degrees) on unlabeled pool images drawn alongside every batch, through a separate linear rotation
  head on the surrogate's penultimate features.
- ``knockoff_smoothing``: every transfer image is queried ``qpi`` times under train-style augmentation (random
  crop with zero padding, optional flips); the mean answer is the label of the un-augmented image.  Every
  augmented query counts, so the transfer set has budget // qpi images.
- ``knockoff_ddae_plus``: D-DAE+ (Chen et al., S&P 2023, as in the ModelGuard code): a recovery MLP trained on
  (D(c), c) pairs, c ~ Dirichlet(K cf y_hat) around the victim's clean output y_hat for every query, maps every
  returned y' back before the surrogate is trained on MLP(y').
- ``knockoff_partial_bayes``: the ModelGuard paper's attack: the same Dirichlet table; y' is recovered as the mean
  of the clean rows whose perturbed version lies within tau = max(tolerance, smallest distance) of y' in L1, among
  rows with the same argmax when the defense keeps the top-1 class.

D-DAE+ and partial Bayes use ORACLE knowledge (spec pitfall 7, kept for comparability with the paper, labelled in
the result): their prior is centred on the victim's clean outputs for the attacker's own queries, read from the
artifact's undefended view (``oracle.clean``; those reads are not queries to the API and are used for nothing
else), and they know the defense and its parameters (read from the artifact's metadata) and apply the same mapping
to the table.  Only defenses that need neither a model nor data are supported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeguard.attacks.base import ATTACKS
from edgeguard.attacks.extraction.base import (
    ExtractionConfig,
    ExtractionContext,
    QueryOracle,
    query_all,
    train_surrogate,
)
from edgeguard.attacks.extraction.knockoff import sample_pool
from edgeguard.config import require
from edgeguard.defenses import DEFENSES, DefenseContext, defense_class, defense_names, make_defense
from edgeguard.errors import BadInput
from edgeguard.runtime.defended import HostDefenseRunner
from edgeguard.training import Mix, TensorData, TrainConfig, fit

ORACLE_PRIOR_NOTE = ("oracle prior (spec pitfall 7): the Dirichlet table is centred on the victim's CLEAN outputs for "
                     "the attacker's own queries, read from the undefended view without counting as queries; an upper "
                     "bound on a real attacker, as in the reference code")


def _train_config(cfg: ExtractionConfig, epochs: int | None = None):
    """The surrogate recipe of :func:`train_surrogate`, for attacks that need ``fit``'s ``step`` hook."""

    return TrainConfig(epochs=epochs or cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, augment=cfg.augment,
                       seed=cfg.seed)


def _l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().sum(1).mean()) if len(a) else 0.0


# --- top-1 -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnockoffTop1Config(ExtractionConfig):
    pass


@ATTACKS.register("knockoff_top1", family="extraction", config=KnockoffTop1Config, needs_pool=True)
def knockoff_top1(oracle: QueryOracle, pool, cfg: KnockoffTop1Config, ctx: ExtractionContext) -> nn.Module:
    x = sample_pool(pool, min(len(pool), oracle.remaining), cfg.seed)
    y = query_all(oracle, x)
    labels = F.one_hot(y.argmax(1), ctx.num_classes).float()
    ctx.log.update({"transfer_set": len(x), "labels": "one-hot(argmax y')"})
    return train_surrogate(ctx.make_surrogate(), x, labels, cfg, desc="knockoff top-1 surrogate", quiet=ctx.quiet)


# --- S4L -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnockoffS4LConfig(ExtractionConfig):
    rotation_weight: float = 1.0  # weight of the 4-way rotation loss
    unlabeled_batch: int = 0  # unlabeled pool images per step, each seen at 4 rotations (0: batch_size // 4)
    unlabeled_max: int = 10000  # unlabeled pool images kept in memory (pool images not in the transfer set)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.rotation_weight >= 0, f"rotation_weight must be >= 0 (got {self.rotation_weight})")
        require(isinstance(self.unlabeled_batch, int) and self.unlabeled_batch >= 0,
                f"unlabeled_batch must be a non-negative integer (got {self.unlabeled_batch})")
        require(isinstance(self.unlabeled_max, int) and self.unlabeled_max >= 1,
                f"unlabeled_max must be a positive integer (got {self.unlabeled_max})")


class _RotationHeaded(nn.Module):
    """The surrogate plus a linear 4-way rotation head on its penultimate features (trained together)."""

    def __init__(self, surrogate: nn.Module):
        super().__init__()
        if not (hasattr(surrogate, "forward_features") and hasattr(surrogate, "forward_head")):
            raise BadInput("knockoff_s4l needs a surrogate with forward_features/forward_head (an edgeguard model)")
        self.surrogate = surrogate
        self.rotation = nn.Linear(surrogate.classifier.in_features, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.surrogate(x)


def rotations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image at 0/90/180/270 degrees, and the rotation labels 0..3."""
    xr = torch.cat([torch.rot90(x, r, dims=(2, 3)) for r in range(4)])
    return xr, torch.arange(4).repeat_interleave(len(x))


@ATTACKS.register("knockoff_s4l", family="extraction", config=KnockoffS4LConfig, needs_pool=True)
def knockoff_s4l(oracle: QueryOracle, pool, cfg: KnockoffS4LConfig, ctx: ExtractionContext) -> nn.Module:
    c, h, w = ctx.input_shape
    if h != w:
        raise BadInput(f"knockoff_s4l rotates images by 90 degrees and needs square inputs (got {h}x{w})")
    n = min(len(pool), oracle.remaining)
    x_all = sample_pool(pool, min(len(pool), n + cfg.unlabeled_max), cfg.seed)  # same order: the first n are the queries
    x, x_unlabeled = x_all[:n], x_all[n:]
    source = "pool images not queried"
    if len(x_unlabeled) == 0:  # the budget took the whole pool: the queried images serve as unlabeled ones too
        x_unlabeled, source = x, "the transfer set itself (the budget used the whole pool)"
    y = query_all(oracle, x)
    model = _RotationHeaded(ctx.make_surrogate())
    nan = torch.full((len(x_unlabeled), ctx.num_classes), float("nan"))  # unlabeled rows are marked by NaN targets
    extra = Mix(TensorData(x_unlabeled, nan), cfg.unlabeled_batch or max(1, cfg.batch_size // 4))

    def step(state, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        labelled = torch.isfinite(yb[:, 0])
        xl, yl = xb[labelled], yb[labelled]
        xr, yr = rotations(xb[~labelled])
        feats = model.surrogate.forward_features(torch.cat([xl, xr]))
        logits = model.surrogate.forward_head(feats[: len(xl)])
        supervised = torch.sum(-yl * F.log_softmax(logits, dim=1), dim=1).mean()
        rotation = F.cross_entropy(model.rotation(feats[len(xl) :]), yr.to(xb.device))
        return supervised + cfg.rotation_weight * rotation

    fit(model, TensorData(x, y), _train_config(cfg), step=step, extra=extra, desc="knockoff S4L surrogate",
        quiet=ctx.quiet)
    ctx.log.update({"transfer_set": len(x), "unlabeled": len(x_unlabeled), "unlabeled_source": source,
                    "unlabeled_batch": extra.batch_size, "rotation_weight": cfg.rotation_weight})
    return model.surrogate.eval()


# --- smoothing -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnockoffSmoothingConfig(ExtractionConfig):
    qpi: int = 3  # augmented queries per transfer image
    pad: int = 4  # random crop: zero padding, in pixels
    flip: bool = False  # also random horizontal flips (natural images; not for digits)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.qpi, int) and self.qpi >= 1, f"qpi must be a positive integer (got {self.qpi})")
        require(isinstance(self.pad, int) and 0 <= self.pad <= 16, f"pad must be an integer in [0, 16] (got {self.pad})")
        require(self.budget >= self.qpi, f"the budget ({self.budget}) must allow at least one image at qpi={self.qpi}")


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator, flip: bool = False) -> torch.Tensor:
    """Per image: a random crop of the zero-padded image (shift by up to ``pad`` pixels), optionally flipped."""
    n, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = dy[:, None] + torch.arange(h)[None]
    cols = dx[:, None] + torch.arange(w)[None]
    if flip:
        flipped = torch.rand(n, generator=generator) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    idx = torch.arange(n)[:, None, None]
    return xp.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


@ATTACKS.register("knockoff_smoothing", family="extraction", config=KnockoffSmoothingConfig, needs_pool=True)
def knockoff_smoothing(oracle: QueryOracle, pool, cfg: KnockoffSmoothingConfig, ctx: ExtractionContext) -> nn.Module:
    n = min(len(pool), oracle.remaining // cfg.qpi)
    x = sample_pool(pool, n, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    chunk = max(1, 512 // cfg.qpi)
    ys = []
    for s in range(0, len(x), chunk):
        xb = x[s : s + chunk]
        xa = torch.cat([random_crop(xb, cfg.pad, gen, cfg.flip) for _ in range(cfg.qpi)])
        ys.append(oracle.query(xa).view(cfg.qpi, len(xb), -1).mean(0))
    y = torch.cat(ys) if ys else torch.zeros(0, ctx.num_classes)
    ctx.log.update({"transfer_set": len(x), "qpi": cfg.qpi, "queries": len(x) * cfg.qpi,
                    "augmentation": f"random crop, {cfg.pad}-px zero padding" + (", horizontal flip" if cfg.flip else "")})
    return train_surrogate(ctx.make_surrogate(), x, y, cfg, desc="knockoff smoothing surrogate", quiet=ctx.quiet)


# --- D-DAE+ and partial Bayes: the oracle-prior table --------------------------------------------------------


@dataclass(frozen=True)
class PriorTableConfig(ExtractionConfig):
    samples_per_query: int = 20  # Dirichlet rows per query (spec: 1e6 rows / 50,000 queries)
    concentration: float = 8.0  # cf: Dirichlet(K * cf * y_hat)
    defense_params: dict = field(default_factory=dict)  # override / complete the published defense parameters

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.samples_per_query, int) and self.samples_per_query >= 1,
                f"samples_per_query must be a positive integer (got {self.samples_per_query})")
        require(self.concentration > 0, f"concentration must be positive (got {self.concentration})")
        require(isinstance(self.defense_params, dict), f"defense_params must be a mapping (got {self.defense_params!r})")


@dataclass(frozen=True)
class DdaePlusConfig(PriorTableConfig):
    recovery_epochs: int = 30  # recovery-MLP epochs (spec: 200)
    recovery_lr: float = 0.01
    recovery_batch: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.recovery_epochs, int) and self.recovery_epochs >= 1,
                f"recovery_epochs must be a positive integer (got {self.recovery_epochs})")
        require(self.recovery_lr > 0 and self.recovery_batch >= 2, "recovery_lr must be positive and recovery_batch >= 2")


@dataclass(frozen=True)
class PartialBayesConfig(PriorTableConfig):
    tolerance: float = 0.01  # tau = max(tolerance, smallest L1 distance)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.tolerance >= 0, f"tolerance must be >= 0 (got {self.tolerance})")


def require_clean_view(oracle: QueryOracle, method: str):
    if oracle.clean is None:
        raise BadInput(f"{method} needs the undefended view of an ONNX artifact (an oracle prior, as in the reference)")
    return oracle.clean


def defense_mapping(oracle: QueryOracle, num_classes: int, overrides: dict | None = None, *,
                    method: str = "this attack") -> tuple[Callable[[torch.Tensor], torch.Tensor], dict]:
    """The deployed defense as a function of clean probabilities (N, K) -> returned vectors (N, K), rebuilt from
    the artifact's published metadata (a host-side defense: its own module), and a description for the log."""

    runner = oracle.runner
    name = runner.info.defense
    if name not in DEFENSES or not defense_class(name).context_free:  # declared on the defense's class
        raise BadInput(f"{method} rebuilds the defense mapping from its parameters alone and supports "
                       f"{', '.join(defense_names(context_free=True))}, not {name!r}, which needs the defender's "
                       "model or data")
    overrides = dict(overrides or {})
    if isinstance(runner, HostDefenseRunner):
        module = runner.defense
        params = module.public_params()
        if overrides:
            params.update(overrides)
            module = make_defense(name, params, DefenseContext(num_classes=num_classes))
    else:
        params = dict(runner.info.defense_record.params)
        params.update(overrides)
        module = make_defense(name, params or None, DefenseContext(num_classes=num_classes))
    if getattr(module, "needs_input", False):
        raise BadInput(f"{method} cannot rebuild {name!r}: the defense reads the input images")
    hard = oracle.hard_label

    def mapping(p: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            q = module(torch.log(p.float().clamp_min(1e-30)))
        if hard:  # the API returns only the top-1 label of the defended vector
            q = F.one_hot(q.argmax(1), num_classes)
        return q.float()

    described = {"name": name, "params": params, "random": bool(module.is_random())}
    if name == "gaussian" and "seed" not in params:  # secret: the key matrix / noise stream is a guess
        described["note"] = "the defense's seed is secret (not in the metadata): seed 0 assumed; pass defense_params"
    return mapping, described


def prior_table(y_hat: torch.Tensor, per_query: int, concentration: float,
                mapping: Callable[[torch.Tensor], torch.Tensor], seed: int,
                chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_query`` clean rows c ~ Dirichlet(K * cf * y_hat) for every query, and D(c) for each."""
    k = y_hat.shape[1]
    alpha = np.repeat(np.maximum(k * concentration * y_hat.double().numpy(), 1e-6), per_query, axis=0)
    g = np.random.default_rng(seed)
    clean_rows = []
    for s in range(0, len(alpha), chunk):
        gam = g.gamma(alpha[s : s + chunk])
        clean_rows.append(torch.from_numpy(gam / gam.sum(1, keepdims=True)).float())
    clean = torch.cat(clean_rows) if clean_rows else torch.zeros(0, k)
    perturbed = torch.cat([mapping(clean[s : s + chunk]) for s in range(0, len(clean), chunk)]) if len(clean) else clean
    return clean, perturbed


def _transfer_with_prior(oracle: QueryOracle, pool, cfg: PriorTableConfig, ctx: ExtractionContext, method: str):
    clean_view = require_clean_view(oracle, method)
    mapping, described = defense_mapping(oracle, ctx.num_classes, cfg.defense_params, method=method)
    x = sample_pool(pool, min(len(pool), oracle.remaining), cfg.seed)
    y = query_all(oracle, x)
    # The oracle prior: the same graph's clean output for the attacker's own queries (not a query to the API).
    y_hat = torch.from_numpy(clean_view.predict(x.numpy(), batch_size=oracle.batch_size)) if len(x) else y.clone()
    clean, perturbed = prior_table(y_hat, cfg.samples_per_query, cfg.concentration, mapping, cfg.seed)
    ctx.log.update({"transfer_set": len(x), "table_rows": len(clean), "samples_per_query": cfg.samples_per_query,
                    "concentration": cfg.concentration, "defense_mapping": described, "prior": ORACLE_PRIOR_NOTE,
                    "perturbed_l1_mean": round(_l1(y, y_hat), 6)})
    return x, y, y_hat, clean, perturbed


class RecoveryMLP(nn.Module):
    """D-DAE's recovery network: K -> h1 -> h2 -> K, Linear + BatchNorm + LeakyReLU(0.2); softmax applied outside."""

    def __init__(self, num_classes: int, hidden: tuple[int, int] | None = None):
        super().__init__()
        h1, h2 = hidden or recovery_hidden(num_classes)
        self.net = nn.Sequential(
            nn.Linear(num_classes, h1), nn.BatchNorm1d(h1), nn.LeakyReLU(0.2),
            nn.Linear(h1, h2), nn.BatchNorm1d(h2), nn.LeakyReLU(0.2),
            nn.Linear(h2, num_classes),
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)

    @torch.no_grad()
    def recover(self, y: torch.Tensor, batch: int = 4096) -> torch.Tensor:
        self.eval()
        outs = [torch.softmax(self(y[s : s + batch]), dim=1) for s in range(0, len(y), batch)]
        return torch.cat(outs) if outs else y.clone()


def recovery_hidden(num_classes: int) -> tuple[int, int]:
    """(128, 64) for K <= 10, (1024, 512) for K = 100, (2048, 1024) for K >= 200 (spec); (512, 256) between [CHOICE]."""
    if num_classes <= 10:
        return 128, 64
    if num_classes < 100:
        return 512, 256
    return (1024, 512) if num_classes < 200 else (2048, 1024)


@ATTACKS.register("knockoff_ddae_plus", family="extraction", config=DdaePlusConfig, needs_pool=True)
def knockoff_ddae_plus(oracle: QueryOracle, pool, cfg: DdaePlusConfig, ctx: ExtractionContext) -> nn.Module:
    x, y, y_hat, clean, perturbed = _transfer_with_prior(oracle, pool, cfg, ctx, "knockoff_ddae_plus")
    if len(clean) % cfg.recovery_batch == 1:  # BatchNorm cannot train on a last batch of one row
        clean, perturbed = clean[:-1], perturbed[:-1]
    k = ctx.num_classes
    mlp = RecoveryMLP(k)

    def l1_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # K x mean absolute error
        return k * (torch.softmax(logits, dim=1) - target).abs().mean()

    tcfg = TrainConfig(epochs=cfg.recovery_epochs, lr=cfg.recovery_lr, momentum=0.9, weight_decay=1e-4,
                       batch_size=cfg.recovery_batch, schedule="step", step_epochs=max(1, cfg.recovery_epochs // 2),
                       gamma=0.5, seed=cfg.seed)
    result = fit(mlp, TensorData(perturbed, clean), tcfg, loss=l1_loss, desc="D-DAE+ recovery MLP", quiet=ctx.quiet)
    recovered = mlp.recover(y)
    ctx.log.update({"recovery": "D-DAE+ MLP", "recovery_hidden": list(recovery_hidden(k)),
                    "recovery_epochs": cfg.recovery_epochs, "recovery_train_loss": result.history[-1]["loss"],
                    "recovery_l1_mean": round(_l1(recovered, y_hat), 6)})
    return train_surrogate(ctx.make_surrogate(), x, recovered, cfg, desc="D-DAE+ surrogate", quiet=ctx.quiet)


def bayes_recover(y: torch.Tensor, perturbed: torch.Tensor, clean: torch.Tensor, tolerance: float, *,
                  same_argmax: bool, max_elements: int = 1 << 25) -> torch.Tensor:
    """Partial Bayes: for every y', the mean of the clean rows whose perturbed rows lie within
    tau = max(tolerance, smallest distance) in L1 (only rows with y''s argmax when ``same_argmax``)."""
    out = torch.empty_like(y)
    if same_argmax:
        ya, ta = y.argmax(1), perturbed.argmax(1)
        groups = [(torch.nonzero(ya == c).squeeze(1), ta == c) for c in range(y.shape[1])]
    else:
        groups = [(torch.arange(len(y)), torch.ones(len(perturbed), dtype=torch.bool))]
    for rows, keep in groups:
        if len(rows) == 0:
            continue
        tp, tc = perturbed[keep], clean[keep]
        if len(tp) == 0:  # no table row has this argmax: fall back to the whole table
            tp, tc = perturbed, clean
        step = max(1, min(1024, max_elements // len(tp)))
        for s in range(0, len(rows), step):
            idx = rows[s : s + step]
            d = torch.cdist(y[idx].double(), tp.double(), p=1)
            tau = d.min(1).values.clamp_min(tolerance)
            w = (d <= tau[:, None]).double()
            out[idx] = ((w @ tc.double()) / w.sum(1, keepdim=True)).to(out.dtype)
    return out


@ATTACKS.register("knockoff_partial_bayes", family="extraction", config=PartialBayesConfig, needs_pool=True)
def knockoff_partial_bayes(oracle: QueryOracle, pool, cfg: PartialBayesConfig, ctx: ExtractionContext) -> nn.Module:
    x, y, y_hat, clean, perturbed = _transfer_with_prior(oracle, pool, cfg, ctx, "knockoff_partial_bayes")
    top1 = bool(len(clean) == 0 or (perturbed.argmax(1) == clean.argmax(1)).all())  # checked on the table itself
    recovered = bayes_recover(y, perturbed, clean, cfg.tolerance, same_argmax=top1)
    ctx.log.update({"recovery": "partial Bayes", "tolerance": cfg.tolerance, "recover_norm": 1,
                    "top1_preserving": top1, "recovery_l1_mean": round(_l1(recovered, y_hat), 6)})
    return train_surrogate(ctx.make_surrogate(), x, recovered, cfg, desc="partial Bayes surrogate", quiet=ctx.quiet)
