"""MAD (host-side prediction poisoning): autograd vs closed-form Jacobian, the oracles, the L1 budget and its cap.

Victim and surrogate are randomly initialised smallcnns (10 classes, 1x32x32 digits-like inputs); no training.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from edgeguard.defenses import DEFENSES, DefenseContext, capabilities, defense_config, make_defense
from edgeguard.defenses.mad import (
    GREEDY_MAX_EVALS,
    Mad,
    MadConfig,
    final_linear,
    mad_objective,
    mad_objective_closed_form,
    make_surrogate,
    surrogate_jacobian,
)
from edgeguard.errors import BadInput
from edgeguard.models import create_model

K = 10


def factory(num_classes: int = K):
    return lambda: create_model("smallcnn", num_classes=num_classes, in_channels=1)


def build(num_classes: int = K, **params) -> Mad:
    return make_defense("mad", params, DefenseContext(num_classes=num_classes, model_factory=factory(num_classes)))


def victim_logits(x: torch.Tensor, num_classes: int = K, scale: float = 1.0) -> torch.Tensor:
    """A randomly initialised victim of the same architecture (another seed than the surrogate)."""
    victim = make_surrogate(factory(num_classes), seed=1234)
    with torch.no_grad():
        return victim(x) * scale


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The autograd path is N·K tiny backward calls: thread hand-offs dominate on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(100, 1, 32, 32, generator=g)
    # spread the confidence: the random victim alone answers near-uniformly
    scale = torch.exp(torch.empty(100, 1).uniform_(0.0, math.log(30.0), generator=g))
    return x, victim_logits(x) * scale


def argmax_candidates(y: torch.Tensor) -> torch.Tensor:
    """(N, 512, K): the argmax oracle's candidates for K = 10, built independently of the module."""
    import itertools

    n, k = y.shape
    out = []
    for ks in y.argmax(-1).tolist():
        rows = [list(b) for b in itertools.product([0, 1], repeat=k) if b[ks]]
        c = torch.tensor(rows, dtype=torch.float64)
        c[:, ks] += 1e-5
        out.append(c / c.sum(-1, keepdim=True))
    return torch.stack(out)


# --- spec modelguard 12 item 8: the shortcut ---------------------------------------------------------------


def test_autograd_objective_matches_closed_form(data):
    x, logits = data
    sur = make_surrogate(factory(), seed=0)
    G = surrogate_jacobian(sur, x).to(torch.float64)  # (100, K, K*d) from torch.autograd
    assert G.shape == (100, K, K * final_linear(sur).in_features)
    with torch.no_grad():
        p_s = torch.softmax(sur(x).double(), -1)
    y = torch.softmax(logits.double(), -1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        dirichlet = torch.distributions.Dirichlet(torch.ones(K)).sample((100, 64)).double()
    cands = torch.cat([argmax_candidates(y), torch.eye(K, dtype=torch.float64).expand(100, K, K), dirichlet], 1)
    a = torch.stack([mad_objective(c, yi, gi) for c, yi, gi in zip(cands, y, G, strict=True)])
    b = mad_objective_closed_form(cands, y.unsqueeze(1), p_s.unsqueeze(1))
    assert a.shape == b.shape == (100, cands.shape[1])
    assert torch.isfinite(a).all() and (a >= 0).all() and (a <= 4 + 1e-9).all()
    assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("oracle", ["argmax", "extreme"])
def test_jacobian_modes_pick_the_same_target(data, oracle):
    x, logits = data
    auto, closed = build(oracle=oracle, jacobian="autograd"), build(oracle=oracle, jacobian="closed_form")
    y_a, star_a = auto.targets(logits, x)
    y_c, star_c = closed.targets(logits, x)
    assert torch.equal(y_a, y_c)
    assert torch.equal(star_a, star_c)
    q_a, q_c = auto(logits, x), closed(logits, x)
    assert q_a.dtype == torch.float32 and q_a.shape == (100, K) and not q_a.requires_grad
    assert (q_a - q_c).abs().max().item() <= 1e-5
    # the NumPy float64 reference (closed form, loop-by-loop transcription of the released oracles)
    ref = closed.reference(logits.numpy(), x.numpy())
    assert np.abs(q_c.numpy() - ref).max() <= 1e-6


@pytest.mark.parametrize("num_classes", [20, 100])
def test_greedy_argmax_oracle_for_many_classes(num_classes):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 1, 32, 32, generator=g)
    logits = victim_logits(x, num_classes, scale=10.0)
    auto = build(num_classes, jacobian="autograd")
    closed = build(num_classes, jacobian="closed_form")
    _, star_a = auto.targets(logits, x)
    _, star_c = closed.targets(logits, x)
    assert torch.equal(star_a, star_c)
    q = closed(logits, x)
    assert np.abs(q.numpy() - closed.reference(logits.numpy(), x.numpy())).max() <= 1e-6
    assert torch.equal(q.argmax(-1), logits.argmax(-1))
    # y* is uniform over a vertex set containing k* (up-weighted); greedy sets have at least 2 classes and stop
    # once about GREEDY_MAX_EVALS candidates were scored
    support = (star_c > 0).sum(-1)
    assert (support >= 2).all()
    if num_classes == 100:
        rounds, evals = 0, 0
        while evals < GREEDY_MAX_EVALS:
            evals += num_classes - 1 - rounds
            rounds += 1
        assert (support <= 1 + rounds).all()


# --- budget, simplex, cap (extraction-defenses A12, pitfall 14) ---------------------------------------------


@pytest.mark.parametrize("eps", [0.05, 0.3, 1.0, 2.0])
@pytest.mark.parametrize("oracle", ["argmax", "extreme"])
def test_l1_budget_and_cap(data, eps, oracle):
    x, logits = data
    mad = build(oracle=oracle, jacobian="closed_form", epsilon=eps)
    y, ystar = mad.targets(logits, x)
    q = mad(logits, x).double()
    dist = (y - ystar).abs().sum(-1)
    l1 = (q - y).abs().sum(-1)
    capped = dist <= eps  # alpha = 1: q = y*
    assert ((l1[~capped] - eps).abs() <= 1e-4).all()
    assert (l1 <= eps + 1e-4).all()
    assert torch.allclose(q[capped], ystar[capped], atol=1e-6)
    assert (q >= 0).all()
    assert (q.sum(-1) - 1).abs().max().item() <= 1e-5
    if eps == 2.0:
        assert capped.any()  # the cap is exercised (uncapped, these rows would go negative)
        uncapped = y + (eps / dist).unsqueeze(-1) * (ystar - y)
        assert (uncapped[capped] < 0).any()
    if eps <= 0.3:
        assert not capped.any()


def test_argmax_oracle_keeps_top1_extreme_may_flip(data):
    x, logits = data
    x = torch.cat([x, x])
    logits = torch.cat([logits, logits * 0.05])  # add near-uniform answers too
    kept = logits.argmax(-1)
    for eps in (0.5, 1.0, 2.0):
        q = build(oracle="argmax", jacobian="closed_form", epsilon=eps)(logits, x)
        assert torch.equal(q.argmax(-1), kept)
        top = q.gather(1, kept.view(-1, 1)).squeeze(1)
        others = q.scatter(1, kept.view(-1, 1), -1.0).amax(-1)
        assert (top > others).all()
    for eps in (0.1, 0.3, 1.0):  # Orekondy's one-hot oracle: flips are allowed, only reported
        q = build(oracle="extreme", jacobian="closed_form", epsilon=eps)(logits, x)
        flips = (q.argmax(-1) != kept).float().mean().item()
        print(f"mad oracle=extreme eps={eps}: top-1 flipped on {flips:.1%} of {len(q)} rows")


# --- determinism, surrogate, state ----------------------------------------------------------------------------


def test_deterministic_and_seeded(data):
    x, logits = data[0][:16], data[1][:16]
    mad = build()
    assert torch.equal(mad(logits, x), mad(logits, x))
    with torch.no_grad():  # autograd inside, even when the caller disables gradients
        q = mad(logits[:8], x[:8])
    assert torch.equal(q, mad(logits[:8], x[:8]))
    with torch.inference_mode():
        assert torch.equal(mad(logits[:8].clone(), x[:8].clone()), q)
    assert all(p.grad is None for p in mad.parameters())
    same, other = build(), build(seed=1)
    for (name, a), b in zip(mad.state_dict().items(), same.state_dict().values(), strict=True):
        assert name.startswith("surrogate.")
        assert torch.equal(a, b)
    assert not torch.equal(mad.surrogate.classifier.weight, other.surrogate.classifier.weight)
    assert not torch.equal(mad(logits, x), other(logits, x))
    # the host sidecar: state dict into a module built with the same factory (any seed), via the entry's restore
    state = {k: v.detach().cpu().clone() for k, v in mad.state_dict().items()}
    restore = DEFENSES.entry("mad").meta["restore"]
    reloaded = restore(MadConfig(seed=7), DefenseContext(num_classes=K, model_factory=factory()), state)
    assert torch.equal(reloaded(logits, x), mad(logits, x))
    with pytest.raises(BadInput, match="does not fit"):
        restore(MadConfig(), DefenseContext(num_classes=K, model_factory=factory()), {"surrogate.x": torch.zeros(1)})


def test_build_keeps_global_rng_and_surrogate_in_eval():
    torch.manual_seed(5)
    a = torch.rand(3)
    torch.manual_seed(5)
    mad = build()
    assert torch.equal(torch.rand(3), a)
    mad.train()
    assert not mad.surrogate.training
    assert not any(p.requires_grad for p in mad.surrogate.parameters())


@pytest.mark.parametrize("tail", [False, True])
def test_generic_surrogate_without_classifier_attribute(tail):
    """The last nn.Linear is found without ``.classifier``; with an op after it (``tail``) the Jacobian is taken
    through the whole batch's output instead of per-example heads."""

    def seq():
        layers = [nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 12)]
        return nn.Sequential(*layers, *([nn.LogSoftmax(-1)] if tail else []))

    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    logits = torch.randn(16, 12, generator=torch.Generator().manual_seed(4)) * 3
    ctx = DefenseContext(num_classes=12, model_factory=seq)
    auto = make_defense("mad", {"jacobian": "autograd"}, ctx)
    closed = make_defense("mad", {"jacobian": "closed_form"}, ctx)
    assert final_linear(auto.surrogate) is auto.surrogate[3]
    assert torch.equal(auto.targets(logits, x)[1], closed.targets(logits, x)[1])
    assert (auto(logits, x) - closed(logits, x)).abs().max().item() <= 1e-5
    G = surrogate_jacobian(auto.surrogate, x[:4])
    with torch.no_grad():
        h = auto.surrogate[:3](x[:4])
        p = torch.softmax(auto.surrogate[3](h), -1)
    expected = (p.unsqueeze(1) - torch.eye(12)).unsqueeze(-1) * h.view(4, 1, 1, 16)  # row k: (p - e_k) h^T
    assert torch.allclose(G, expected.reshape(4, 12, 12 * 16), atol=1e-6)


def test_interface_and_registry():
    entry = DEFENSES.entry("mad")
    assert entry.config is MadConfig and capabilities("mad").placement == "host"
    mad = build(epsilon=0.5, seed=3)
    assert Mad.fusable is False and Mad.needs_input is True and mad.placement == "host"
    d = mad.describe()
    assert d["name"] == "mad" and d["placement"] == "host"
    assert d["params"] == {"epsilon": 0.5, "oracle": "argmax", "jacobian": "autograd"}  # seed is secret
    assert MadConfig() == MadConfig(epsilon=1.0, oracle="argmax", jacobian="autograd", seed=0)
    empty = mad(torch.zeros(0, K), torch.zeros(0, 1, 32, 32))
    assert empty.shape == (0, K)


# --- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, -0.1, 2.0001, 3, float("nan"), float("inf")])
def test_epsilon_out_of_range(eps):
    with pytest.raises(BadInput, match="epsilon"):
        MadConfig(epsilon=eps)
    with pytest.raises(BadInput, match="epsilon"):
        defense_config("mad", {"epsilon": str(eps)})


def test_bad_parameters_and_missing_inputs(data):
    x, logits = data
    with pytest.raises(BadInput):
        defense_config("mad", {"oracle": "lp_argmax"})
    with pytest.raises(BadInput):
        defense_config("mad", {"jacobian": "numeric"})
    with pytest.raises(BadInput):
        MadConfig(oracle="random")
    with pytest.raises(BadInput, match="no model factory was given"):
        make_defense("mad", {}, DefenseContext(num_classes=K))
    with pytest.raises(BadInput, match="outputs"):  # surrogate head does not match the class count
        make_defense("mad", {}, DefenseContext(num_classes=12, model_factory=factory(K)))
    mad = build()
    with pytest.raises(BadInput, match="images"):
        mad(logits[:2])
    with pytest.raises(BadInput):
        mad(logits[:2, :5], x[:2])
    with pytest.raises(BadInput):
        mad(logits[:2], x[:3])
