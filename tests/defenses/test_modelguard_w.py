"""ModelGuard-W (docs/defenses.md): the sort solver against PuLP/CBC, feasibility,
determinism, float32, the ONNX export and config validation."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from edgeguard.defenses import DefenseContext, defense_config, make_defense
from edgeguard.defenses.base import ALLOWED_OPS
from edgeguard.defenses.modelguard_w import (
    ModelGuardW,
    ModelGuardWConfig,
    lp_reference,
    objective,
    solve_sort,
)
from edgeguard.errors import BackendUnavailable, BadInput

EPSILONS = (0.1, 0.5, 1.0)
MARGIN = 1e-4


def random_probs(n: int, k: int, seed: int) -> np.ndarray:
    """Half Dirichlet (concentrations 0.1, 0.5, 1, 5), half softmax of N(0, s^2) logits (s in 0.5, 2, 5)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, k))
    for i in range(n):
        if i % 2 == 0:
            out[i] = rng.dirichlet(np.full(k, (0.1, 0.5, 1.0, 5.0)[(i // 2) % 4]))
        else:
            z = rng.normal(0.0, (0.5, 2.0, 5.0)[(i // 2) % 3], k)
            e = np.exp(z - z.max())
            out[i] = e / e.sum()
    return out


def top2_gap(y: np.ndarray) -> np.ndarray:
    s = np.sort(y, axis=-1)
    return s[:, -1] - s[:, -2]


def assert_feasible(y: np.ndarray, q: np.ndarray, eps: float, tol: float = 1e-6) -> None:
    """Spec 12.1 on the rows with a top-2 gap >= margin."""
    keep = top2_gap(y) >= MARGIN
    y, q = y[keep], q[keep]
    rows = np.arange(len(y))
    k = y.argmax(-1)
    assert np.abs(q.sum(-1) - 1.0).max() <= tol
    assert q.min() >= 0.0 and q.max() <= 1.0
    assert np.abs(q - y).sum(-1).max() <= eps + tol
    assert (q.argmax(-1) == k).all()
    others = np.where(np.arange(y.shape[1]) == k[:, None], -np.inf, q)
    assert (q[rows, k] - others.max(-1)).min() >= MARGIN - 1e-7


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The solver's (N, grid, K) element-wise work is small per op: one intra-op thread avoids OpenMP stalls on
    a busy 2-core runner (ten times faster here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lp_cases():
    """{(K, eps): (y, sort solver float64, LP)}: 300 vectors per K, a third at each epsilon (600 LPs, ~5 s)."""
    pytest.importorskip("pulp")
    cases = {}
    for k in (10, 100):
        y_all = random_probs(300, k, seed=k)
        for i, eps in enumerate(EPSILONS):
            y = y_all[i::3]
            q = solve_sort(torch.from_numpy(y), eps, MARGIN).numpy()
            cases[k, eps] = (y, q, lp_reference(y, eps, MARGIN))
    return cases


@pytest.mark.parametrize("k", [10, 100])
def test_sort_solver_reaches_the_lp_optimum(lp_cases, k):
    """Spec 12.2: objectives (not vectors: the LP is degenerate) within 1e-6 of PuLP/CBC's optimum."""
    for eps in EPSILONS:
        y, q, ql = lp_cases[k, eps]
        gap = objective(y, q) - objective(y, ql)
        print(f"K={k} eps={eps}: sort - LP objective in [{gap.min():.2e}, {gap.max():.2e}]")
        assert gap.max() <= 1e-6, (k, eps, int(gap.argmax()))
        assert gap.min() >= -1e-6  # CBC's tolerances only; a lower value would mean an infeasible answer
        assert_feasible(y, ql, eps, tol=1e-6)
    # a cheaper schedule (8 points, 10 refinements: 88 evaluations instead of 320) reaches the same optimum
    y, _, ql = lp_cases[k, 1.0]
    q = solve_sort(torch.from_numpy(y), 1.0, MARGIN, grid=8, refinements=10).numpy()
    assert (objective(y, q) - objective(y, ql)).max() <= 1e-6


def test_lp_and_sort_leave_near_ties_unchanged():
    pytest.importorskip("pulp")
    y = np.array([[0.40, 0.40 - 5e-5, 0.1, 0.1 - 5e-5, 0.05, 0.05 - 5e-5], [0.5, 0.2, 0.1, 0.1, 0.05, 0.05]])
    y = y / y.sum(-1, keepdims=True)
    q = solve_sort(torch.from_numpy(y), 0.5, MARGIN).numpy()
    ql = lp_reference(y, 0.5, MARGIN)
    assert np.array_equal(q[0], y[0]) and np.array_equal(ql[0], y[0])
    assert not np.allclose(q[1], y[1])
    assert abs(objective(y[1], q[1]) - objective(y[1], ql[1])) <= 1e-6


def test_spec_example_shape():
    """Spec 2.4's worked example: the lowest class is raised to just below the top, the 2nd..5th emptied."""
    y = np.array([[0.411, 0.142, 0.115, 0.081, 0.078, 0.054, 0.048, 0.037, 0.033, 0.0025]])
    y = y / y.sum()
    q = solve_sort(torch.from_numpy(y), 1.0, MARGIN).numpy()[0]
    assert np.abs(q - y[0]).sum() == pytest.approx(1.0, abs=1e-9)
    assert q[0] - q[9] == pytest.approx(MARGIN, abs=1e-9)
    assert np.allclose(q[1:6], 0.0, atol=1e-12)


@pytest.mark.parametrize("k", [10, 100])
def test_sort_solver_feasible_and_saturated(k):
    """Spec 12.1 (500 vectors per K, 1,000 in all) and the L1 saturation of 12.2 (>= 99% of rows)."""
    y = random_probs(500, k, seed=100 + k)
    saturated = []
    for eps in EPSILONS:
        q = solve_sort(torch.from_numpy(y), eps, MARGIN).numpy()
        assert_feasible(y, q, eps)
        keep = top2_gap(y) >= MARGIN
        saturated.append(np.abs(q - y).sum(-1)[keep] >= eps - 1e-4)
    saturated = np.concatenate(saturated)
    print(f"K={k}: L1 saturated on {saturated.mean():.2%} of rows")
    assert saturated.mean() >= 0.99


def test_deterministic_batch_invariant_and_float32():
    """Spec 12.3: the same y twice gives identical y'; a row alone gives the batch's answer; float32 is within
    1e-4 nats of float64."""
    y = random_probs(300, 10, seed=7)
    p = torch.from_numpy(y)
    q1, q2 = solve_sort(p, 1.0), solve_sort(p.clone(), 1.0)
    assert torch.equal(q1, q2)
    alone = torch.cat([solve_sort(p[i : i + 1], 1.0) for i in range(0, 300, 37)])
    assert torch.allclose(alone, q1[::37], rtol=0.0, atol=1e-12)
    q32 = solve_sort(p.float(), 1.0)
    assert q32.dtype == torch.float32
    d = np.abs(objective(y, q32.double().numpy()) - objective(y, q1.numpy()))
    print(f"float32 vs float64 objective: max |diff| {d.max():.2e}")
    assert d.max() <= 1e-4
    assert_feasible(y, q32.double().numpy(), 1.0, tol=1e-5)


def test_module_registry_and_placement():
    ctx = DefenseContext(num_classes=10)
    mod = make_defense("modelguard_w", {"epsilon": "0.5"}, ctx)
    assert isinstance(mod, ModelGuardW) and mod.cfg == ModelGuardWConfig(epsilon=0.5)
    assert mod.placement == "graph"
    assert mod.describe()["params"]["epsilon"] == 0.5
    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(0)) * 3
    q = mod(logits)
    p = torch.softmax(logits, -1)
    assert torch.equal(q, solve_sort(p, 0.5, MARGIN))
    lp = make_defense("modelguard_w", {"solver": "lp"}, ctx)
    assert lp.placement == "host"
    assert ModelGuardW.placement_for(None) == "graph"  # the default config is fused


def test_lp_solver_module_matches_reference():
    pytest.importorskip("pulp")
    mod = make_defense("modelguard_w", {"solver": "lp", "epsilon": 1.0}, DefenseContext(num_classes=10))
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(1)) * 2
    q = mod(logits)
    assert q.dtype == torch.float32 and q.shape == (8, 10)
    ref = mod.reference(logits.numpy())
    y = torch.softmax(logits.double(), -1).numpy()
    assert np.abs(objective(y, q.double().numpy()) - objective(y, ref)).max() <= 1e-5
    sort = ModelGuardW(ModelGuardWConfig(epsilon=1.0), 10)(logits.double()).numpy()
    assert np.abs(objective(y, sort) - objective(y, ref)).max() <= 1e-6


def test_missing_pulp_is_backend_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pulp", None)
    with pytest.raises(BackendUnavailable, match="PuLP"):
        lp_reference(np.full((1, 4), 0.25), 1.0)


def test_onnx_export_matches_torch():
    """The fused head: allowed ops only, dynamic batch, ONNX Runtime within 1e-5 of torch float32 on 1,000 rows."""
    ort = pytest.importorskip("onnxruntime")
    mod = ModelGuardW(ModelGuardWConfig(), 10).eval()
    prog = torch.onnx.export(mod, (torch.randn(2, 10),), None, dynamo=True, opset_version=20, verbose=False,
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    ops = {n.op_type for n in prog.model_proto.graph.node}
    assert ops <= ALLOWED_OPS, sorted(ops - ALLOWED_OPS)
    sess = ort.InferenceSession(prog.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    z = (rng.normal(0.0, 1.0, (1000, 10)) * rng.choice([0.5, 2.0, 5.0], (1000, 1))).astype(np.float32)
    got = sess.run(None, {sess.get_inputs()[0].name: z})[0]
    with torch.no_grad():
        ref = mod(torch.from_numpy(z)).numpy()
    diff = np.abs(got - ref).max()
    print(f"ONNX Runtime vs torch float32, 1,000 rows: max |diff| {diff:.2e}")
    assert diff <= 1e-5
    y = torch.softmax(torch.from_numpy(z).double(), -1).numpy()
    assert_feasible(y, got.astype(np.float64), 1.0, tol=1e-5)
    assert sess.run(None, {sess.get_inputs()[0].name: z[:1]})[0].shape == (1, 10)


@pytest.mark.parametrize("params", [{"epsilon": "0"}, {"epsilon": -0.5}, {"epsilon": 2.5}, {"grid": 4},
                                    {"refinements": 11}, {"margin": 0.02}, {"solver": "simplex"}, {"foo": 1}])
def test_bad_parameters_are_bad_input(params):
    with pytest.raises(BadInput):
        defense_config("modelguard_w", params)


def test_config_defaults():
    cfg = defense_config("modelguard_w", {})
    assert cfg == ModelGuardWConfig(epsilon=1.0, solver="sort", grid=16, refinements=8, margin=1e-4)
    assert defense_config("modelguard_w", {"epsilon": "2"}).epsilon == 2.0
