"""Data-free extraction: DFME (Truong et al., CVPR 2021) and MAZE (Kariyappa et al., CVPR 2021).

A generator synthesises the queries; it is trained to *maximise* the disagreement between the student and the
victim, while the student is trained to *minimise* it on fresh generator samples.  The victim gives no
gradients, so the generator's gradient is a zeroth-order forward-difference estimate (:func:`zo_gradient`):
``m`` random unit directions per image, step ``zo_eps`` in the generator's pre-activation space, scaled by the
input dimension.  Spec: extraction-defenses 5.2 (one script adapted from cake-lab/datafree-model-extraction).

* DFME: student loss L1 between the student logits and the victim's log-probabilities minus their mean
  ("logit correction", ``log clip(q, 1e-12) - mean``); m = 1; generator Adam lr 1e-4.
* MAZE (as replicated by that script): student loss KL(victim softmax || student); m = 10; generator SGD
  lr 1e-4, momentum 0.9, wd 5e-4.

Per iteration: one generator step costing ``gen_batch * (m + 1)`` queries (``m`` probes and the base point
per image), then ``student_steps`` student steps costing ``gen_batch`` each.  The run plans its iterations
from ``oracle.remaining`` up front and never asks for more; a last, partial iteration (fewer student steps,
with or without its generator step) is run only when it fits.

**edgeguard choice** (docs/extraction.md): every query, gradient-estimation probes included, goes through
the oracle, i.e. through the deployed defense; the released code's bypass of the defense for probes is not
reproduced.  The surrogate returned is the final student (pitfall 9: no best-over-epochs selection on test
data); ``ctx.log`` records the best and final per-iteration student loss.

Training loop: the student trains in the one loop, :func:`edgeguard.training.fit`, one optimizer step per
generated batch (``fit(..., step=...)`` over a dummy index set with ``batch_size=1``); the generator step of
each iteration runs inside that ``step`` callback before the iteration's first student step.  ``fit`` owns the
student's SGD, schedule, seeding, divergence check and progress; the generator's own optimizer is stepped in
the callback, its learning rate following the student's schedule as in the reference script.

Deviations from the reference: the reference schedule (multistep x0.3 at 10/30/50 % of epochs) is replaced by
``fit``'s cosine schedule (``student_schedule``; MAZE intended cosine anyway); defaults are scaled down
(``gen_batch`` 64 instead of 128) for CPU budgets; the student architecture is ``surrogate`` (smallcnn by
default) instead of ResNet-34-8x.  ``epochs``, ``batch_size``, ``augment`` and ``query_set`` of
:class:`ExtractionConfig` are not used by these attacks (the budget sets the length of the run).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from edgeguard.attacks.base import ATTACKS
from edgeguard.attacks.extraction.base import ExtractionConfig, ExtractionContext, QueryOracle
from edgeguard.config import require
from edgeguard.errors import BadInput
from edgeguard.training import TensorData, TrainConfig, fit

LOG_FLOOR = 1e-12  # probabilities are clipped here before the log (the victim may return exact zeros)


# --- generator --------------------------------------------------------------------------------------------


class GeneratorA(nn.Module):
    """DFME's ``GeneratorA`` for a C x H x W input (H, W divisible by 4); images in [0, 1].

    z -> linear -> 128 x H/4 x W/4 -> BN -> up x2 -> conv3x3 128 -> BN -> LeakyReLU(0.2) -> up x2 -> conv3x3 64
    -> BN -> LeakyReLU(0.2) -> conv3x3 C -> BN (no affine) -> tanh, then ``(tanh + 1) / 2`` because the oracle takes
    [0, 1] images (the reference's [-1, 1] output is its 0.5/0.5-normalised view of the same images).
    """

    def __init__(self, input_shape: tuple[int, int, int], nz: int = 256, ngf: int = 64):
        super().__init__()
        c, h, w = (int(v) for v in input_shape)
        if c < 1 or h < 4 or w < 4 or h % 4 or w % 4:
            raise BadInput(f"the data-free generator needs an input of C x H x W with H and W divisible by 4 "
                           f"(the victim takes {tuple(input_shape)})")
        self.input_shape = (c, h, w)
        self.nz = int(nz)
        self.init = (h // 4, w // 4)
        self.l1 = nn.Linear(self.nz, 2 * ngf * self.init[0] * self.init[1])
        self.bn0 = nn.BatchNorm2d(2 * ngf)
        self.conv1 = nn.Conv2d(2 * ngf, 2 * ngf, 3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(2 * ngf)
        self.conv2 = nn.Conv2d(2 * ngf, ngf, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(ngf)
        self.conv3 = nn.Conv2d(ngf, c, 3, stride=1, padding=1)
        self.bn3 = nn.BatchNorm2d(c, affine=False)

    def pre_activation(self, z: torch.Tensor) -> torch.Tensor:
        """The output before tanh: the space in which the zeroth-order probes are taken."""
        x = self.l1(z.view(len(z), -1)).view(len(z), -1, *self.init)
        x = self.bn0(x)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = F.leaky_relu(self.bn1(self.conv1(x)), 0.2)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = F.leaky_relu(self.bn2(self.conv2(x)), 0.2)
        return self.bn3(self.conv3(x))

    @staticmethod
    def activate(pre: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(pre) + 1.0) / 2.0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activation(z))


# --- zeroth-order gradient estimate -----------------------------------------------------------------------


@torch.no_grad()
def zo_gradient(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, m: int = 1, eps: float = 1e-3,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-difference estimate of each sample's gradient of a per-sample black-box objective.

    ``f`` maps a batch of points ``(K, *x.shape[1:])`` to values ``(K,)``; it is called once, on
    ``len(x) * (m + 1)`` points (``m`` probes ``x_i + eps * u_ij`` per sample, then the sample itself), so when
    ``f`` queries an oracle that is exactly the query cost.  The estimate is
    ``d / m * sum_j (f(x_i + eps u_ij) - f(x_i)) / eps * u_ij`` with ``u_ij`` uniform on the unit sphere of
    dimension ``d``, an (asymptotically) unbiased estimate of ``grad f(x_i)``.  Returns ``(gradient, f(x))``.
    """
    if m < 1 or eps <= 0:
        raise BadInput(f"the zeroth-order estimate needs m >= 1 directions and a positive step (got m={m}, eps={eps})")
    n, shape = len(x), tuple(x.shape[1:])
    d = math.prod(shape)
    u = torch.randn(n, m, d, generator=generator).to(device=x.device, dtype=x.dtype)
    u = u / u.norm(dim=2, keepdim=True).clamp_min(1e-12)
    base = x.detach().reshape(n, 1, d)
    pts = torch.cat([base + eps * u, base], dim=1).reshape(n * (m + 1), *shape)
    values = f(pts).reshape(n, m + 1).to(x.dtype)
    diff = (values[:, :m] - values[:, m:]) / eps  # (n, m)
    grad = d * (diff.unsqueeze(2) * u).mean(dim=1)
    return grad.reshape(n, *shape), values[:, m]


# --- losses -------------------------------------------------------------------------------------------


def teacher_target(q: torch.Tensor, loss: str) -> torch.Tensor:
    """What the student fits: mean-corrected log-probabilities (L1) or the probabilities themselves (KL)."""
    if loss == "l1":
        lq = q.clamp_min(LOG_FLOOR).log()
        return lq - lq.mean(dim=1, keepdim=True)
    return q


def per_sample_loss(s_logits: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Student-teacher disagreement per sample: mean |s - t| over classes (L1), or KL(q || softmax(s)) (KL)."""
    if loss == "l1":
        return (s_logits - target).abs().mean(dim=1)
    return F.kl_div(F.log_softmax(s_logits, dim=1), target, reduction="none").sum(dim=1)


def student_loss(s_logits: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """The student's objective on a batch (the reference's ``F.l1_loss`` mean or ``kl_div`` batchmean)."""
    if loss == "l1":
        return F.l1_loss(s_logits, target)
    return F.kl_div(F.log_softmax(s_logits, dim=1), target, reduction="batchmean")


# --- configs --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataFreeConfig(ExtractionConfig):
    """Generator-based, data-free extraction; ``budget`` is the total number of victim queries (probes included)."""

    loss: Literal["l1", "kl"] = "l1"  # student loss and generator objective
    lr: float = 0.1  # student SGD learning rate
    student_momentum: float = 0.9
    student_weight_decay: float = 5e-4
    student_schedule: Literal["cosine", "none"] = "cosine"
    student_steps: int = 5  # student steps per iteration (the reference's d_iter)
    gen_batch: int = 64  # images per generator batch (reference: 128)
    nz: int = 256  # generator latent dimension
    gen_width: int = 64  # generator channels: 2 * gen_width after the linear layer, gen_width before the last conv
    gen_optimizer: Literal["adam", "sgd"] = "adam"
    gen_lr: float = 1e-4
    gen_momentum: float = 0.9  # SGD only
    gen_weight_decay: float = 0.0
    zo_m: int = 1  # random directions per image for the zeroth-order gradient estimate
    zo_eps: float = 1e-3  # forward-difference step (in the generator's pre-activation space)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.loss in ("l1", "kl"), f"loss must be l1 or kl (got {self.loss!r})")
        require(self.student_schedule in ("cosine", "none"), f"student_schedule must be cosine or none (got {self.student_schedule!r})")
        require(self.gen_optimizer in ("adam", "sgd"), f"gen_optimizer must be adam or sgd (got {self.gen_optimizer!r})")
        require(isinstance(self.zo_m, int) and self.zo_m >= 1, f"zo_m (gradient-estimation directions) must be at least 1 (got {self.zo_m})")
        require(self.zo_eps > 0, f"zo_eps (the forward-difference step) must be positive (got {self.zo_eps})")
        require(self.student_steps >= 1, f"student_steps must be at least 1 (got {self.student_steps})")
        require(self.gen_batch >= 2, f"gen_batch must be at least 2 (batch norm in the generator; got {self.gen_batch})")
        require(self.nz >= 1 and self.gen_width >= 1, f"nz and gen_width must be at least 1 (got {self.nz}, {self.gen_width})")
        require(self.gen_lr > 0, f"gen_lr must be positive (got {self.gen_lr})")
        require(self.student_momentum >= 0 and self.gen_momentum >= 0, "momentum must be non-negative")
        require(self.student_weight_decay >= 0 and self.gen_weight_decay >= 0, "weight decay must be non-negative")
        require(self.budget >= self.gen_batch,
                f"the budget ({self.budget}) must pay for at least one student batch of gen_batch={self.gen_batch} "
                "queries; raise the budget or lower gen_batch")


@dataclass(frozen=True)
class DfmeConfig(DataFreeConfig):
    """DFME: L1 on mean-corrected log-probabilities, m=1, generator Adam lr 1e-4."""


@dataclass(frozen=True)
class MazeConfig(DataFreeConfig):
    """MAZE as replicated: KL(victim || student), m=10, generator SGD lr 1e-4, momentum 0.9, wd 5e-4."""

    loss: Literal["l1", "kl"] = "kl"
    gen_optimizer: Literal["adam", "sgd"] = "sgd"
    gen_weight_decay: float = 5e-4
    zo_m: int = 10


# --- the attack -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How the budget is spent: ``full`` complete iterations, then a partial one if anything fits."""

    batch: int
    gen_cost: int
    full: int
    partial_gen: bool
    partial_students: int
    student_steps: int

    @classmethod
    def of(cls, remaining: int, batch: int, m: int, student_steps: int) -> Plan:
        gen_cost = batch * (m + 1)
        cost = gen_cost + student_steps * batch
        full, rest = divmod(max(0, remaining), cost)
        partial_gen = rest >= gen_cost + batch
        partial_students = min(student_steps, (rest - gen_cost if partial_gen else rest) // batch)
        return cls(batch, gen_cost, full, partial_gen, partial_students, student_steps)

    @property
    def total_student_steps(self) -> int:
        return self.full * self.student_steps + self.partial_students

    @property
    def generator_steps(self) -> int:
        return self.full + int(self.partial_gen)

    @property
    def iterations(self) -> int:
        return self.full + int(self.partial_students > 0)

    @property
    def queries(self) -> int:
        return self.generator_steps * self.gen_cost + self.total_student_steps * self.batch


def _generator_optimizer(gen: nn.Module, cfg: DataFreeConfig) -> torch.optim.Optimizer:
    if cfg.gen_optimizer == "adam":
        return torch.optim.Adam(gen.parameters(), lr=cfg.gen_lr, weight_decay=cfg.gen_weight_decay)
    return torch.optim.SGD(gen.parameters(), lr=cfg.gen_lr, momentum=cfg.gen_momentum, weight_decay=cfg.gen_weight_decay)


def _run(oracle: QueryOracle, cfg: DataFreeConfig, ctx: ExtractionContext, desc: str) -> nn.Module:
    c, h, w = ctx.input_shape
    gen = GeneratorA((c, h, w), nz=cfg.nz, ngf=cfg.gen_width)
    student = ctx.make_surrogate()
    opt_g = _generator_optimizer(gen, cfg)
    plan = Plan.of(oracle.remaining, cfg.gen_batch, cfg.zo_m, cfg.student_steps)
    if plan.total_student_steps == 0:
        raise BadInput(f"{oracle.remaining} queries left cannot pay for one student batch of {cfg.gen_batch}")
    rng = torch.Generator().manual_seed(cfg.seed + 1)  # latent codes and probe directions, apart from fit's seed
    # The reference divides the L1 estimate by (classes * batch) and leaves the KL one per sample (as replicated).
    grad_scale = 1.0 / (ctx.num_classes * cfg.gen_batch) if cfg.loss == "l1" else 1.0
    spent = {"probes": 0, "student": 0}
    it_losses: list[float] = []  # mean student loss per iteration
    gen_losses: list[float] = []  # disagreement at the generator's base points, per generator step
    current: list[float] = []

    def probe_objective(pre: torch.Tensor) -> torch.Tensor:
        x = GeneratorA.activate(pre)
        q = oracle.query(x)
        spent["probes"] += len(x)
        was = student.training
        student.eval()
        try:
            s = student(x)
        finally:
            student.train(was)
        return -per_sample_loss(s, teacher_target(q, cfg.loss), cfg.loss)  # descending this maximises disagreement

    def generator_step(lr_factor: float) -> None:
        for group in opt_g.param_groups:
            group["lr"] = cfg.gen_lr * lr_factor
        gen.train()
        opt_g.zero_grad(set_to_none=True)
        pre = gen.pre_activation(torch.randn(cfg.gen_batch, cfg.nz, generator=rng))
        grad, value = zo_gradient(probe_objective, pre.detach(), m=cfg.zo_m, eps=cfg.zo_eps, generator=rng)
        pre.backward(grad * grad_scale)
        opt_g.step()
        gen_losses.append(float(-value.mean()))

    def step(state, _x, _y) -> torch.Tensor:
        i = state.step
        if i % plan.student_steps == 0:
            if current:
                it_losses.append(sum(current) / len(current))
                current.clear()
            if i // plan.student_steps < plan.full or plan.partial_gen:
                generator_step(state.optimizer.param_groups[0]["lr"] / cfg.lr)
        with torch.no_grad():
            x = gen(torch.randn(cfg.gen_batch, cfg.nz, generator=rng))
        q = oracle.query(x)
        spent["student"] += len(x)
        value = student_loss(state.model(x), teacher_target(q, cfg.loss), cfg.loss)
        current.append(float(value.detach()))
        return value

    n = plan.total_student_steps
    idx = torch.zeros(n, 1)
    fit(student, TensorData(idx, idx), TrainConfig(epochs=1, batch_size=1, optimizer="sgd", lr=cfg.lr,
                                                    momentum=cfg.student_momentum,
                                                    weight_decay=cfg.student_weight_decay,
                                                    schedule=cfg.student_schedule, seed=cfg.seed),
        step=step, desc=desc, quiet=ctx.quiet)
    if current:
        it_losses.append(sum(current) / len(current))
    ctx.log.update({"loss": cfg.loss, "zo_m": cfg.zo_m, "iterations": plan.iterations,
                    "generator_steps": plan.generator_steps, "student_steps": plan.total_student_steps,
                    "queries_probes": spent["probes"], "queries_student": spent["student"],
                    "queries_unused": oracle.remaining, "student_loss_best": round(min(it_losses), 6),
                    "student_loss_final": round(it_losses[-1], 6),
                    "generator_disagreement_final": round(gen_losses[-1], 6) if gen_losses else None})
    return student.eval()


@ATTACKS.register("dfme", family="extraction", config=DfmeConfig, needs_pool=False)
def dfme(oracle: QueryOracle, pool, cfg: DfmeConfig, ctx: ExtractionContext) -> nn.Module:
    return _run(oracle, cfg, ctx, "dfme student")


@ATTACKS.register("maze", family="extraction", config=MazeConfig, needs_pool=False)
def maze(oracle: QueryOracle, pool, cfg: MazeConfig, ctx: ExtractionContext) -> nn.Module:
    return _run(oracle, cfg, ctx, "maze student")
