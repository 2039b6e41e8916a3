"""Extraction through the budgeted oracle: KnockoffNets against a deployed ONNX artifact, queries counted at the
Runner, metrics, the CLI and its bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeguard.attacks.extraction import BudgetExceeded, QueryOracle, extract, method_config
from edgeguard.cli import main
from edgeguard.errors import BadInput
from edgeguard.runtime import open_runner
from edgeguard.runtime.ort_runner import OrtRunner


@pytest.fixture
def counted(monkeypatch):
    """Rows predicted by any ONNX Runtime runner of the *defended* artifact (undefended views excluded)."""
    calls = {"rows": 0}
    real = OrtRunner._predict_impl

    def counting(self, x):
        if not self.undefended:
            calls["rows"] += len(x)
        return real(self, x)

    monkeypatch.setattr(OrtRunner, "_predict_impl", counting)
    return calls


def test_oracle_counts_refuses_beyond_budget_and_hides_scores_in_hard_label_mode(tiny_onnx):
    x = np.random.default_rng(0).random((30, 1, 32, 32), dtype=np.float32)
    with open_runner(tiny_onnx) as r, open_runner(tiny_onnx, undefended=True) as clean:
        o = QueryOracle(r, 40, clean=clean)
        p = o.query(x)
        assert o.used == 30 and o.remaining == 10 and torch.allclose(p.sum(1), torch.ones(30), atol=1e-5)
        assert o.seconds > 0  # the time spent answering, reported as the cell's "queries" phase
        assert o.l1_mean == 0.0  # an undefended graph returns exactly its clean output
        with pytest.raises(BudgetExceeded):
            o.query(x[:11])
        assert o.used == 30  # a refused call costs nothing
        h = QueryOracle(r, 5, hard_label=True).query(x[:5])
        assert set(h.unique().tolist()) == {0.0, 1.0} and (h.sum(1) == 1).all()
        assert (h.argmax(1) == p[:5].argmax(1)).all()


def test_knockoff_fidelity_well_above_chance_and_budget_counted_at_the_runner(tiny_onnx, counted):
    cfg = method_config("knockoff", {"budget": 2000, "epochs": 10})
    res = extract(tiny_onnx, None, "knockoff", cfg)
    # the attack's 2,000 queries, plus the evaluator's own pass over the 540 test images (not attack queries)
    assert res.queries_used == 2000 and counted["rows"] == 2000 + 540
    assert res.defense == "none" and res.defense_l1_mean == 0.0
    assert res.fidelity > 0.3 and res.surrogate_accuracy > 0.3  # chance is 0.1 (10 digit classes); measured 0.47
    assert res.defender_accuracy > 0.9
    # where the time went: answering lies inside the attack's interval (attack >= 0), training outweighs it
    t = res.timings
    assert set(t) == {"setup", "queries", "attack", "evaluation"} and min(t.values()) >= 0
    assert t["attack"] > t["queries"] > 0  # 10 epochs vs 2,000 queries


def test_cli_extract_writes_the_surrogate_bundle_and_json(tiny_bundle, tmp_path, capsys):
    from edgeguard.api import export_bundle
    from edgeguard.bundle import load_bundle

    onnx_path = tmp_path / "h.onnx"
    export_bundle(tiny_bundle, onnx_path, defense="heuristic")
    out, j = tmp_path / "stolen", tmp_path / "r.json"
    rc = main(["attack", "extract", str(onnx_path), "--method", "knockoff", "--budget", "300", "--epochs", "1",
               "--out", str(out), "--json", str(j)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(j.read_text())
    assert res["queries_used"] == 300 and res["defense"] == "heuristic" and res["defense_l1_mean"] > 0
    b = load_bundle(out)
    assert b.manifest["stages"][-1]["stage"] == "attack_extract"
    assert json.loads((out / "attack.json").read_text())["fidelity"] == res["fidelity"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--method", "knockoff", "--budget", "0"], "budget must be a positive integer"),
        (["--method", "knockoff", "--budget", "-5"], "budget must be a positive integer"),
        (["--method", "nope", "--budget", "10"], "unknown attack 'nope'"),
        (["--method", "finetune", "--budget", "10"], "not an extraction attack"),
        (["--method", "knockoff", "--budget", "10", "--query-option", "channels=3"], "but the victim takes (1, 32, 32)"),
        (["--method", "knockoff", "--budget", "10", "--param", "nope=1"], "unknown parameter 'nope'"),
    ],
)
def test_cli_extract_bad_input(tiny_onnx, tmp_path, capsys, args, needle):
    out = tmp_path / "s"
    rc = main(["attack", "extract", str(tiny_onnx), *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_query_set_must_fit_the_victim(tiny_onnx):
    with pytest.raises(BadInput, match="query set"):
        extract(tiny_onnx, None, "knockoff", method_config("knockoff", {"budget": 10, "query_options": {"size": 28}}))
