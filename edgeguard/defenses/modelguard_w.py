"""``modelguard_w``: ModelGuard-W (strategy ``mld``) of Tang et al., USENIX Security 2024.

ModelGuard-W answers each query with the vector, within an L1 budget of the true probabilities, that makes a
"weak" extraction attacker (one that trains on the answers as they come) learn the most wrong thing:
with ``y = softmax(z)``, ``k* = argmax y`` and ``c_j = log(y_j + 1e-6)`` it solves the linear program
(docs/defenses.md)::

    minimise   sum_j c_j y'_j                      (= maximise the cross-entropy H(y', y))
    subject to sum_j y'_j = 1,  0 <= y'_j <= 1,
               ||y' - y||_1 <= epsilon,
               y'_k* - y'_j >= margin   for j != k*  (the top-1 class is kept)

Two solvers give the same optimum (the LP is often degenerate: the objective agrees, the vector may not):

- ``solver="sort"`` (default): an exact solver without an LP library, written in torch (:func:`solve_sort`),
  vectorised over the batch, float32 or float64.  For a fixed top value ``t = y'_k*`` the optimum has a closed
  form (forced cuts to ``t - margin``, then mass moved from the most to the least probable non-top classes,
  docs/defenses.md); its value ``f(t)`` is convex and piecewise linear in ``t``, so ``t`` is found by a
  ``grid``-point search over ``[max(0, y_k* - eps), min(1, y_k* + eps)]`` followed by ``refinements``
  re-gridding rounds, steered by the sign of the exact right slope ``f'(t+)`` (carried along in forward mode)
  rather than by comparing values of ``f``: float32 runtimes then agree on the chosen ``t`` even where ``f`` is
  nearly flat, and a flat optimal stretch resolves to the ``t`` closest to ``y_k*``.  In float64 it agrees
  with CBC's optimum to ~3e-7 nats (CBC's own tolerance); float32 is within ~1e-6 of float64.  Only Sort
  (TopK), CumSum, GatherElements, ScatterElements and element-wise ops: the module exports to ONNX and is
  fused after the logits (``fusable``); memory is O(N * grid * K) per round.
- ``solver="lp"``: the reference LP solved per query by PuLP/CBC (:func:`lp_reference`), on the host only,
  as in the official code (5-20 ms per query); needs the ``lp`` extra.

Defaults: ``epsilon=1.0`` (the value of every script of the paper), ``margin=1e-4`` (hard-coded there),
``solver="sort"``, ``grid=16``, ``refinements=8`` (final bracket ``2 * eps / 15**9``, about 5e-11; 144 evaluations
of t per query, which measured 2-4x faster batched than 64 x 5 rounds at the same optimum).

Fallback (both solvers): a row whose top-2 gap is below ``margin`` (``y`` itself violates the margin
constraint) comes back unchanged, ``y' = y``, and so does a row whose LP CBC does not report optimal.  The
official code ignores the LP status and returns whatever CBC left in the variables, and does spend budget on
near-tied rows; edgeguard leaves them alone in both solvers so that the two agree.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from edgeguard.config import Config, require
from edgeguard.defenses.base import DEFENSES, Defense, DefenseContext, softmax_np
from edgeguard.errors import BackendUnavailable

LOG_OFFSET = 1e-6  # c_j = log(y_j + 1e-6), hard-coded in the official code
_INFEASIBLE = 1e4  # cost of a candidate t that admits no feasible y' (f itself lies within [-14, 0])


@dataclass(frozen=True)
class ModelGuardWConfig(Config):
    epsilon: float = 1.0  # L1 budget ||y' - y||_1 <= epsilon
    solver: Literal["sort", "lp"] = "sort"  # exact torch solver (fusable) or PuLP/CBC on the host
    grid: int = 16  # candidate values of t = y'_k* per search round (sort solver)
    refinements: int = 8  # re-gridding rounds around the best t (sort solver)
    margin: float = 1e-4  # argmax margin y'_k* - y'_j >= margin

    def __post_init__(self) -> None:
        require(0.0 < self.epsilon <= 2.0, f"modelguard_w epsilon must lie in (0, 2] (got {self.epsilon})")
        require(8 <= self.grid <= 1024, f"modelguard_w grid must lie in [8, 1024] (got {self.grid})")
        require(0 <= self.refinements <= 10, f"modelguard_w refinements must lie in [0, 10] (got {self.refinements})")
        require(0.0 <= self.margin < 0.01, f"modelguard_w margin must lie in [0, 0.01) (got {self.margin})")


# --- the exact sort-based solver (torch) ---------------------------------------------------------------
#
# Every quantity is carried with its right derivative in t (forward mode on a piecewise-linear function):
# the search for t follows the sign of f'(t+), which float32 gets right unless |f'| is below ~1e-6, instead
# of comparing values of f, whose float32 noise (~1e-7 nats) makes near-flat stretches of f a coin toss
# between runtimes.  Where the two arguments of a min/max are equal the derivative of the second is taken:
# equal over an interval means equal slopes, so only isolated kinks are affected, and a kink that is the
# minimiser lies at the end of both cells it could send the search to.


def _dmin(a, da, b, db):
    """min(a, b) and its derivative."""
    return torch.minimum(a, b), torch.where(a < b, da, db)


def _dmax(a, da, b, db):
    """max(a, b) and its derivative."""
    return torch.maximum(a, b), torch.where(a > b, da, db)


def _solve_fixed_t(rest: torch.Tensor, c_rest: torch.Tensor, yk: torch.Tensor, ck: torch.Tensor,
                   t: torch.Tensor, eps: float, margin: float, values: bool = True):
    """Optimal non-top values, cost, slope of the cost and infeasibility for candidate top values ``t``.

    ``rest``/``c_rest``: (N, 1, K-1) non-top probabilities and their costs, sorted ascending; ``yk``/``ck``:
    (N, 1, 1); ``t``: (N, G, 1).  Returns y'_rest (N, G, K-1) and ``c . y'`` (N, G, 1) (both None unless
    ``values``), the slope f'(t+) (N, G, 1) and the infeasible mask (N, G, 1).  Spec 2.4: cut every non-top
    class to ``U = t - margin`` (forced cut F), then move mass from the most to the least probable non-top
    classes within the budget left.
    """
    zero = t * 0.0
    u = t - margin  # cap of every non-top class; du/dt = 1
    b = eps - (t - yk).abs()  # budget left after moving the top class
    db = torch.where(t < yk, 1.0, -1.0) + zero
    v = torch.minimum(rest, u)  # forced cuts
    dv = (rest > u).to(t.dtype)
    f = (rest - v).sum(-1, keepdim=True)
    df = -dv.sum(-1, keepdim=True)
    s, ds = (yk - t) + f, df - 1.0  # net mass the non-top classes must absorb
    r, dr = b - f, db - df  # budget left for the transport
    room, droom = u - v, 1.0 - dv
    cum_v, dcum_v = torch.cumsum(v, dim=-1), torch.cumsum(dv, dim=-1)
    n_rest = rest.shape[-1]
    count = torch.tensor([float(j + 1) for j in range(n_rest)], dtype=t.dtype, device=t.device)
    cum_room, dcum_room = torch.cumsum(room, dim=-1), count - dcum_v  # room of the j+1 lowest
    total_room = cum_room[..., -1:]
    total_v, dtotal_v = cum_v[..., -1:], dcum_v[..., -1:]
    above, dabove = total_v - cum_v, dtotal_v - dcum_v  # mass strictly above each class
    # the largest inflow I for which receivers (filled from the lowest up) and donors (drained from the highest
    # down) stay apart: I <= room below a split and I - S <= mass above it, for some split
    g, dg = _dmin(cum_room, dcum_room, s + above, ds + dabove)
    best = g.argmax(-1, keepdim=True)  # equal maxima over an interval have equal slopes
    cross, dcross = torch.gather(g, -1, best), torch.gather(dg, -1, best)
    g0, dg0 = _dmin(zero, zero, s + total_v, ds + dtotal_v)  # the split below every class
    cross, dcross = _dmax(cross, dcross, g0, dg0)
    inflow, dinflow = _dmin(cross, dcross, 0.5 * (r + s), 0.5 * (dr + ds))  # and I + (I - S) <= R
    lower, dlower = _dmax(s, ds, zero, zero)
    inflow, dinflow = _dmax(inflow, dinflow, lower, dlower)
    outflow, doutflow = inflow - s, dinflow - ds
    x, dx = _dmax(inflow - (cum_room - room), dinflow - (dcum_room - droom), zero, zero)
    recv, drecv = _dmin(x, dx, room, droom)  # receivers: lowest first, each up to U
    x, dx = _dmax(outflow - above, doutflow - dabove, zero, zero)
    drain, ddrain = _dmin(x, dx, v, dv)  # donors: highest first, each down to 0
    new_rest = cost = None
    if values:
        new_rest = v + recv - drain
        cost = ck * t + (c_rest * new_rest).sum(-1, keepdim=True)
    slope = ck + (c_rest * (dv + drecv - ddrain)).sum(-1, keepdim=True)
    bad = (u < 0) | (b < 0) | (r < s.abs()) | (s > total_room) | (s + total_v < 0)
    return new_rest, cost, slope, bad


def solve_sort(p: torch.Tensor, eps: float, margin: float = 1e-4, grid: int = 16, refinements: int = 8) -> torch.Tensor:
    """ModelGuard-W answers for probability rows ``p`` (N, K) with the exact sort-based solver.

    ``f(t)``, the best objective with ``y'_k* = t``, is convex and piecewise linear.  Each round evaluates its
    right slope at ``grid`` points of the current bracket and keeps the cell where the slope turns
    non-negative (infeasible points count as "go towards y_k*"); ties (a flat optimal stretch) go to the
    ``t`` closest to ``y_k*``.  ``refinements`` more rounds shrink the bracket by ``grid - 1`` each (defaults:
    1 / 63**5 ~ 1e-9), and the better of its two ends is used.  Same dtype as ``p``; rows whose top-2 gap is
    below ``margin`` come back unchanged.  Export-friendly: no data-dependent control flow (rounds unroll).
    """
    n_cls = p.shape[-1]
    if n_cls < 2:
        return p
    a, idx = torch.sort(p, dim=-1)  # ascending; the top class is last
    rest = a[:, : n_cls - 1].unsqueeze(1)  # (N, 1, K-1)
    yk = a[:, n_cls - 1 :].unsqueeze(1)  # (N, 1, 1)
    c_rest = torch.log(rest + LOG_OFFSET)
    ck = torch.log(yk + LOG_OFFSET)
    frac = torch.tensor([i / (grid - 1) for i in range(grid)], dtype=p.dtype, device=p.device).view(1, grid, 1)
    pos = torch.tensor([float(i + 1) for i in range(grid)], dtype=p.dtype, device=p.device).view(1, grid, 1)
    lo = torch.clamp(yk - eps, min=0.0)
    hi = torch.clamp(yk + eps, max=1.0)
    for _ in range(refinements + 1):
        cand = lo + (hi - lo) * frac  # (N, G, 1)
        _, _, slope, bad = _solve_fixed_t(rest, c_rest, yk, ck, cand, eps, margin, values=False)
        below = cand < yk
        # towards the minimiser closest to y_k*; infeasible points lie on the far side of the feasible interval
        go_right = (bad & below) | (~bad & ((below & (slope <= 0)) | (~below & (slope < 0))))
        # leading run of "go right" (a point at the right end of the feasible interval may claim a negative slope
        # for the infeasible stretch after it): the minimiser lies between points n_right - 1 and n_right
        run = torch.cumsum(go_right.to(p.dtype), dim=1)
        n_right = (run > pos - 0.5).to(torch.int64).sum(1, keepdim=True)  # (N, 1, 1)
        # the bracket's ends are the evaluated points themselves (not recomputed: in float32 a bracket narrower
        # than an ulp would otherwise land back on the infeasible side of a boundary optimum)
        lo = torch.gather(cand, 1, torch.clamp(n_right - 1, min=0))
        hi = torch.gather(cand, 1, torch.clamp(n_right, max=grid - 1))
    # the better feasible end of the last bracket; y_k* (feasible when the top-2 gap is >= margin) only if
    # neither end is
    cand = torch.cat([lo, hi, yk], dim=1)  # (N, 3, 1)
    new_rest, cost, _, bad = _solve_fixed_t(rest, c_rest, yk, ck, cand, eps, margin)
    cost = torch.where(bad, _INFEASIBLE, cost)
    cost = torch.cat([cost[:, :2], cost[:, 2:] * 0.0 + 0.5 * _INFEASIBLE], dim=1)
    pick = torch.argmin(cost, dim=1, keepdim=True)  # (N, 1, 1)
    new_rest = torch.gather(new_rest, 1, pick.expand(-1, -1, n_cls - 1)).squeeze(1)
    out_sorted = torch.cat([new_rest, torch.gather(cand, 1, pick).squeeze(1)], dim=-1)
    out = torch.scatter(p, -1, idx, out_sorted)
    tied = (a[:, n_cls - 1 :] - a[:, n_cls - 2 : n_cls - 1]) < margin
    return torch.where(tied, p, out)


# --- the reference LP (PuLP/CBC) and the objective -----------------------------------------------------


def objective(y: np.ndarray, yprime: np.ndarray) -> np.ndarray:
    """Per-row LP objective ``sum_j log(y_j + 1e-6) y'_j`` (lower is better for the defender)."""
    y = np.asarray(y, dtype=np.float64)
    return (np.log(y + LOG_OFFSET) * np.asarray(yprime, dtype=np.float64)).sum(-1)


def lp_reference(y: np.ndarray, eps: float, margin: float = 1e-4) -> np.ndarray:
    """Solve the ModelGuard-W LP row by row with PuLP/CBC (one LpProblem per row, as the official code).

    ``y``: (N, K) probabilities; returns (N, K) float64.  Rows whose top-2 gap is below ``margin`` (``y``
    violates the margin constraint) are left unchanged without solving, as in :func:`solve_sort`.  Unlike the
    official code the solver status is checked: a row that CBC does not solve to optimality (infeasible,
    numerical failure) also comes back unchanged.
    """
    try:
        import pulp
    except ImportError:
        raise BackendUnavailable("ModelGuard-W's LP solver needs PuLP: pip install 'edgeguard[lp]'") from None
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    out = y.copy()
    n_cls = y.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        solver = pulp.PULP_CBC_CMD(msg=False)  # the CBC binary bundled with PuLP, as the official code
    if hasattr(pulp.LpProblem, "add_variable"):  # PuLP >= 3.3 deprecates free-standing LpVariable(...)
        def new_var(prob, name, lo, hi):
            return prob.add_variable(name, lo, hi)
    else:  # pragma: no cover - PuLP 2.x
        def new_var(prob, name, lo, hi):
            return pulp.LpVariable(name, lo, hi)
    for i, row in enumerate(y):
        top = np.sort(row)[-2:]
        if n_cls < 2 or top[1] - top[0] < margin:
            continue  # near-tie: keep y
        k = int(row.argmax())
        c = np.log(row + LOG_OFFSET)
        prob = pulp.LpProblem("modelguard_w", pulp.LpMinimize)
        yp = [new_var(prob, f"y{j}", 0.0, 1.0) for j in range(n_cls)]
        z = [new_var(prob, f"z{j}", 0.0, None) for j in range(n_cls)]
        prob += pulp.lpDot([float(x) for x in c], yp)
        prob += pulp.lpSum(yp) == 1.0
        for j in range(n_cls):
            prob += z[j] >= yp[j] - float(row[j])
            prob += z[j] >= float(row[j]) - yp[j]
            if j != k:
                prob += yp[k] - yp[j] >= margin
        prob += pulp.lpSum(z) <= eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # PuLP 3.x: PULP_CBC_CMD is slated for 4.0
            status = prob.solve(solver)
        if status != pulp.LpStatusOptimal:
            continue
        out[i] = [v.varValue if v.varValue is not None else row[j] for j, v in enumerate(yp)]
    return out


# --- the defense module --------------------------------------------------------------------------------


class ModelGuardW(Defense):

    keeps_top1 = True  # by construction: the argmax is kept
    context_free = True  # its mapping follows from the published parameters alone
    name = "modelguard_w"
    cfg: ModelGuardWConfig

    def __init__(self, cfg: ModelGuardWConfig, num_classes: int):
        super().__init__(cfg, num_classes)

    @classmethod
    def placement_for(cls, cfg) -> str:
        return "graph" if cfg is None or cfg.solver == "sort" else "host"  # the LP runs on the host only

    def forward(self, logits: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        c = self.cfg
        p = torch.softmax(logits, dim=-1)
        if c.solver == "lp":
            q = lp_reference(p.detach().cpu().double().numpy(), c.epsilon, c.margin)
            return torch.from_numpy(q).to(dtype=p.dtype, device=p.device)
        return solve_sort(p, c.epsilon, c.margin, c.grid, c.refinements)

    def reference(self, logits: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
        """The LP optimum (PuLP/CBC): compare objectives with ``forward``, not vectors (degenerate optima)."""
        return lp_reference(softmax_np(logits), self.cfg.epsilon, self.cfg.margin)


def restore_modelguard_w(cfg: ModelGuardWConfig, ctx: DefenseContext, state) -> ModelGuardW:
    """Host-side (``solver=lp``) ModelGuard-W has no state: rebuilt from its parameters."""
    return ModelGuardW(cfg, ctx.num_classes)


@DEFENSES.register("modelguard_w", config=ModelGuardWConfig, restore=restore_modelguard_w)
def build_modelguard_w(cfg: ModelGuardWConfig, ctx: DefenseContext) -> ModelGuardW:
    return ModelGuardW(cfg, ctx.num_classes)
