"""Data-free extraction (DFME, MAZE) against a deployed ONNX artifact: end to end within the budget, queries
counted at the Runner, the zeroth-order gradient estimate, the generator's output range, bad configs."""

from __future__ import annotations

import pytest
import torch

import edgeguard.attacks.extraction.datafree as datafree  # registers dfme and maze
from edgeguard.attacks.extraction import driver
from edgeguard.attacks.extraction.driver import extract, method_config
from edgeguard.errors import BadInput
from edgeguard.runtime.ort_runner import OrtRunner


@pytest.fixture
def counted(monkeypatch):
    """Rows predicted by the defended artifact's Runner during the attack (not the undefended view used for the
    L1 report, nor the driver's evaluation on the test split afterwards)."""
    calls = {"rows": 0, "on": True}
    real_predict, real_eval = OrtRunner._predict_impl, driver._accuracy_and_fidelity

    def counting(self, x):
        if calls["on"] and not self.undefended:
            calls["rows"] += len(x)
        return real_predict(self, x)

    def evaluating(*a, **kw):
        calls["on"] = False
        try:
            return real_eval(*a, **kw)
        finally:
            calls["on"] = True

    monkeypatch.setattr(OrtRunner, "_predict_impl", counting)
    monkeypatch.setattr(driver, "_accuracy_and_fidelity", evaluating)
    return calls


SMALL = {"budget": 3000, "gen_batch": 32, "student_steps": 2, "nz": 64, "gen_width": 16,
         "surrogate_options": {"width": 8, "hidden": 32}}  # narrow generator and student: seconds on a CPU


@pytest.mark.parametrize("method", ["dfme", "maze"])
def test_runs_end_to_end_within_budget_counted_at_the_runner(tiny_onnx, counted, method):
    cfg = method_config(method, SMALL)
    res = extract(tiny_onnx, None, method, cfg)
    assert counted["rows"] == res.queries_used <= 3000
    d = res.details
    m = cfg.zo_m
    assert d["queries_probes"] == d["generator_steps"] * cfg.gen_batch * (m + 1)
    assert d["queries_student"] == d["student_steps"] * cfg.gen_batch
    assert d["queries_probes"] + d["queries_student"] == res.queries_used
    assert d["queries_unused"] == 3000 - res.queries_used < cfg.gen_batch * (m + 1 + cfg.student_steps)
    assert d["iterations"] >= 1 and d["student_loss_best"] <= d["student_loss_final"]
    assert 0.0 <= res.fidelity <= 1.0 and res.defender_accuracy > 0.9


def test_budget_plan_spends_full_iterations_then_a_partial_one_that_fits():
    p = datafree.Plan.of(3000, 32, 1, 2)  # 128 per iteration: 23 full, 56 left -> one student step, no generator
    assert (p.full, p.partial_gen, p.partial_students, p.queries) == (23, False, 1, 2976)
    p = datafree.Plan.of(3000, 32, 10, 5)  # 512 per iteration: 5 full, 440 left -> generator (352) + 2 students
    assert (p.full, p.partial_gen, p.partial_students, p.queries) == (5, True, 2, 2976)
    for budget in range(32, 2000, 37):
        for m in (1, 3, 10):
            q = datafree.Plan.of(budget, 32, m, 5)
            assert q.queries <= budget and budget - q.queries < 32 * (m + 1 + 5)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def test_zeroth_order_estimate_points_along_the_true_gradient():
    torch.manual_seed(0)
    w = torch.randn(2, 2, 2)

    def f(x):  # a smooth per-sample objective on 2x2x2 "images" (dimension 8)
        return (torch.sin(3 * x) * w).sum(dim=(1, 2, 3)) + (x**2).sum(dim=(1, 2, 3))

    x = torch.rand(200, 2, 2, 2)
    true = 3 * torch.cos(3 * x) * w + 2 * x
    calls = []

    def counted_f(p):
        calls.append(len(p))
        return f(p)

    g = torch.Generator().manual_seed(1)
    est, value = datafree.zo_gradient(counted_f, x, m=10, eps=1e-3, generator=g)
    assert calls == [200 * 11]  # m probes plus the base point per sample, in one call
    assert torch.allclose(value, f(x))
    assert _cosine(est, true).mean() > 0.5
    # scaled by the input dimension, the estimate is unbiased: averaged over many draws it matches the gradient
    x1 = x[:1].repeat(4000, 1, 1, 1)
    est1, _ = datafree.zo_gradient(f, x1, m=1, eps=1e-3, generator=g)
    mean = est1.mean(0, keepdim=True)
    assert _cosine(mean, true[:1]).item() > 0.95
    assert 0.85 < (mean.norm() / true[0].norm()).item() < 1.15


@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 32, 32), (3, 16, 24)])
def test_generator_output_in_unit_range_with_the_victim_shape(shape):
    g = datafree.GeneratorA(shape, nz=32)
    with torch.no_grad():
        x = g(torch.randn(4, 32) * 5)
    assert x.shape == (4, *shape) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    with pytest.raises(BadInput, match="divisible by 4"):
        datafree.GeneratorA((1, 30, 32))


@pytest.mark.parametrize(
    "method, params, needle",
    [
        ("dfme", {"budget": 0}, "budget must be a positive integer"),
        ("maze", {"budget": -3}, "budget must be a positive integer"),
        ("dfme", {"zo_m": -1}, "zo_m"),
        ("maze", {"zo_m": 0}, "zo_m"),
        ("dfme", {"zo_eps": 0}, "zo_eps"),
        ("dfme", {"budget": 10}, "at least one student batch"),
        ("maze", {"gen_optimizer": "rmsprop"}, "gen_optimizer"),
    ],
)
def test_bad_config_is_bad_input(method, params, needle):
    with pytest.raises(BadInput, match=needle):
        method_config(method, params)


def test_configs_follow_the_spec_defaults():
    d, m = method_config("dfme"), method_config("maze")
    assert (d.loss, d.zo_m, d.zo_eps, d.gen_optimizer, d.gen_lr, d.lr, d.student_steps) == ("l1", 1, 1e-3, "adam", 1e-4, 0.1, 5)
    assert (m.loss, m.zo_m, m.gen_optimizer, m.gen_lr, m.gen_momentum, m.gen_weight_decay) == ("kl", 10, "sgd", 1e-4, 0.9, 5e-4)
