"""JBDA-TR and the adaptive KnockoffNets variants (top-1, S4L, smoothing, D-DAE+, partial Bayes) run end to end
against an ONNX artifact through ``extract`` and never query the victim beyond their budget (rows counted at the
Runner); JBDA-TR's synthetic samples stay in the radius and in [0, 1]; partial Bayes recovers clean vectors better
than the defended ones; the oracle-prior attacks refuse an artifact without an undefended view."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import edgeguard.attacks.extraction.adaptive as adaptive  # registers the adaptive methods
import edgeguard.attacks.extraction.jbda as jbda  # registers jbda_tr
from edgeguard.attacks.extraction import QueryOracle, driver, extract, method_config
from edgeguard.errors import BadInput
from edgeguard.models import create_model
from edgeguard.runtime import open_runner
from edgeguard.runtime.ort_runner import OrtRunner

BUDGET = 200
FAST = {"epochs": 1, "surrogate_options": {"width": 8, "hidden": 32}, "query_options": {"n": 400}}
METHODS = {
    "jbda_tr": {"budget": 230, "seed_size": 50},  # 50 -> 200 -> 230: the last round is subsampled
    "knockoff_top1": {},
    "knockoff_s4l": {},
    "knockoff_smoothing": {"qpi": 3},
    "knockoff_ddae_plus": {"recovery_epochs": 2},
    "knockoff_partial_bayes": {},
}


@pytest.fixture(scope="module")
def heuristic_onnx(tiny_bundle, tmp_path_factory):
    from edgeguard.api import export_bundle

    out = tmp_path_factory.mktemp("adaptive") / "heuristic.onnx"
    export_bundle(tiny_bundle, out, defense="heuristic")
    return out


@pytest.fixture
def victim_rows(monkeypatch):
    """Rows predicted through the defended victim graph, split into the attack and the driver's evaluation."""
    counts = {"attack": 0, "eval": 0}
    evaluating = {"on": False}
    predict = OrtRunner._predict_impl

    def counting(self, x):
        if not self.undefended:  # the undefended view (oracle prior, L1 report) is not the API
            counts["eval" if evaluating["on"] else "attack"] += len(x)
        return predict(self, x)

    measure = driver._accuracy_and_fidelity

    def measuring(*args, **kwargs):
        evaluating["on"] = True
        return measure(*args, **kwargs)

    monkeypatch.setattr(OrtRunner, "_predict_impl", counting)
    monkeypatch.setattr(driver, "_accuracy_and_fidelity", measuring)
    return counts


@pytest.mark.parametrize("method", list(METHODS))
def test_method_runs_within_budget(method, heuristic_onnx, victim_rows):
    params = {"budget": BUDGET, **FAST, **METHODS[method]}
    res = extract(heuristic_onnx, None, method, method_config(method, params), quiet=True)
    budget = params["budget"]
    assert res.method == method and res.defense == "heuristic" and res.budget == budget
    assert victim_rows["attack"] == res.queries_used <= budget
    assert victim_rows["eval"] == 540  # the digits test split, after the attack
    assert 0.0 <= res.fidelity <= 1.0 and 0.0 <= res.surrogate_accuracy <= 1.0
    d = res.details
    if method == "jbda_tr":
        assert res.queries_used == budget and d["set_sizes"] == [50, 200, 230] and d["rounds"] == 2
        assert d["radius"] == pytest.approx(0.022)
    elif method == "knockoff_smoothing":
        assert res.queries_used == (budget // 3) * 3 and d["transfer_set"] == budget // 3
    else:
        assert res.queries_used == budget and d["transfer_set"] == budget
    if method in ("knockoff_ddae_plus", "knockoff_partial_bayes"):
        assert "oracle prior" in d["prior"] and d["table_rows"] == 20 * budget
        assert d["defense_mapping"]["name"] == "heuristic"
        assert d["perturbed_l1_mean"] == pytest.approx(res.defense_l1_mean, abs=1e-4)
    if method == "knockoff_partial_bayes":
        assert d["top1_preserving"] is True
        assert d["recovery_l1_mean"] < d["perturbed_l1_mean"]  # recovery works on a non-quantising defense


def test_jbda_samples_stay_in_radius_and_range():
    torch.manual_seed(0)
    model = create_model("smallcnn", num_classes=10, in_channels=1, width=4, hidden=16)
    x = torch.rand(40, 1, 32, 32)
    x[:10] = 0.0  # parents on the border of [0, 1]
    x[10:20] = 1.0
    radius = 0.022
    new = jbda.jacobian_augment(model, x, 10, steps=4, radius=radius, generator=torch.Generator().manual_seed(1))
    assert new.shape == x.shape
    assert (new - x).abs().max() <= radius + 1e-6
    assert new.min() >= 0.0 and new.max() <= 1.0
    assert (new - x).abs().amax(dim=(1, 2, 3))[20:].min() > radius / 2  # the steps moved every interior parent
    assert all(p.grad is None for p in model.parameters())  # input gradients only


def test_rebuilt_defense_mapping_matches_the_artifact(heuristic_onnx, digits_test):
    x, _ = digits_test.tensors(0, 128)
    x = (x * 0.3 + 0.35).numpy()  # washed-out images: low confidence, where the heuristic perturbs
    with open_runner(heuristic_onnx) as victim, open_runner(heuristic_onnx, undefended=True) as clean:
        oracle = QueryOracle(victim, 10, clean=clean)
        mapping, described = adaptive.defense_mapping(oracle, 10)
        q, p = victim.predict(x), clean.predict(x)
    assert described["name"] == "heuristic" and described["params"]["beta"] == 0.7
    assert np.abs(q - p).sum(1).max() > 0.05  # the defense is active on these inputs
    assert np.abs(mapping(torch.from_numpy(p)).numpy() - q).max() < 1e-4
    assert oracle.used == 0


@pytest.mark.parametrize("method", ["knockoff_ddae_plus", "knockoff_partial_bayes"])
def test_oracle_prior_attacks_need_the_undefended_view(method, tiny_bundle):
    cfg = method_config(method, {"budget": 50, **FAST})
    with pytest.raises(BadInput, match="needs the undefended view of an ONNX artifact"):
        extract(tiny_bundle, None, method, cfg, quiet=True)


def test_defenses_needing_a_model_are_refused():
    oracle = SimpleNamespace(runner=SimpleNamespace(info=SimpleNamespace(defense="mad")), hard_label=False)
    with pytest.raises(BadInput, match="'mad'"):
        adaptive.defense_mapping(oracle, 10, method="knockoff_partial_bayes")


def test_bayes_recovery_picks_the_nearest_rows():
    clean = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    perturbed = torch.tensor([[0.5, 0.3, 0.2], [0.504, 0.296, 0.2], [0.3, 0.5, 0.2]])
    y = torch.tensor([[0.5, 0.3, 0.2], [0.32, 0.48, 0.2]])
    out = adaptive.bayes_recover(y, perturbed, clean, 0.01, same_argmax=True)
    assert torch.allclose(out[0], clean[:2].mean(0)) and torch.allclose(out[1], clean[2])


@pytest.mark.parametrize(("method", "params", "match"), [
    ("jbda_tr", {"budget": 0}, "budget"),
    ("jbda_tr", {"k": -1}, "k must"),
    ("jbda_tr", {"k": "-2"}, "k must"),
    ("jbda_tr", {"radius": 0}, "radius"),
    ("jbda_tr", {"seed_size": 0}, "seed_size"),
    ("knockoff_top1", {"budget": 0}, "budget"),
    ("knockoff_s4l", {"budget": -5}, "budget"),
    ("knockoff_s4l", {"rotation_weight": -1}, "rotation_weight"),
    ("knockoff_smoothing", {"qpi": 0}, "qpi"),
    ("knockoff_smoothing", {"budget": 2, "qpi": 3}, "budget"),
    ("knockoff_ddae_plus", {"budget": 0}, "budget"),
    ("knockoff_ddae_plus", {"samples_per_query": 0}, "samples_per_query"),
    ("knockoff_ddae_plus", {"recovery_epochs": 0}, "recovery_epochs"),
    ("knockoff_partial_bayes", {"budget": 0}, "budget"),
    ("knockoff_partial_bayes", {"concentration": 0}, "concentration"),
    ("knockoff_partial_bayes", {"bogus": 1}, "unknown parameter"),
])
def test_bad_configs_are_bad_input(method, params, match):
    with pytest.raises(BadInput, match=match):
        method_config(method, params)
