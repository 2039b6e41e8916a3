"""The defense x attack grid: cells, resume, outputs, config validation, backends."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from edgeguard.errors import BackendUnavailable, BadInput
from edgeguard.grid import GridConfig, expand_sweep, run_grid
from edgeguard.grid import run as grid  # run_grid looks the task functions up here


def tiny_mapping(bundle, **extra):
    return {
        "name": "tiny",
        "victim": {"bundle": str(bundle)},
        "defenses": ["none", {"name": "heuristic", "params": {"beta": [0.5, 0.9]}}],
        "attacks": [{"method": "knockoff", "params": {"budget": 200, "epochs": 1, "query_options": {"n": 400}}}],
        "seeds": [0],
        "workers": 2,
        **extra,
    }


@pytest.fixture(scope="module")
def tiny_grid(tiny_bundle, tmp_path_factory):
    """The tiny grid run once through the spawn process pool (2 workers): 3 defense points x 1 attack x 1 seed."""
    out = tmp_path_factory.mktemp("grid") / "run"
    cfg = GridConfig.from_mapping(tiny_mapping(tiny_bundle))
    res = run_grid(cfg, out)
    return cfg, out, res


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("*.json"))}


def _counting(monkeypatch, name):
    calls = []
    real = getattr(grid, name)

    def counted(job):
        calls.append(job.get("cell_id", job.get("key")))
        return real(job)

    monkeypatch.setattr(grid, name, counted)
    return calls


def test_grid_runs_and_writes_every_output(tiny_grid):
    cfg, out, res = tiny_grid
    assert res.passed, res.report["failures"]
    rep = json.loads((out / "grid.json").read_text())
    assert rep["counts"] == {"cells": 3, "done": 3, "computed": 3, "reused": 0, "failed": 0}
    assert len(rep["cells"]) == 3 and len(list((out / "cells").glob("*.json"))) == 3
    assert len(list((out / "artifacts").glob("*/model.onnx"))) == 3  # one export per defense point
    labels = [r["defense"] for r in rep["summary"]]
    assert labels == ["none", "heuristic[beta=0.5]", "heuristic[beta=0.9]"]
    base = rep["summary"][0]
    assert base["undefended"] and base["epsilon_eff"]["mean"] == pytest.approx(0.0, abs=1e-6)
    for row in rep["summary"]:
        assert row["seeds"] == 1 and row["queries_used"]["mean"] == 200
        assert 0.0 <= row["fidelity"]["mean"] <= 1.0 and row["defender_accuracy"]["mean"] > 0.5
        assert row["surrogate_accuracy"]["std"] is None  # one seed: no spread to report
    heur = rep["summary"][2]
    assert heur["epsilon_eff"]["mean"] > 0  # the defense perturbed the attacker's queries
    cell = json.loads((out / "cells" / f"{rep['cells'][1]['cell_id']}.json").read_text())
    assert cell["defense"]["params"] == {"beta": 0.5} and cell["attack"]["config"]["budget"] == 200
    assert set(cell["result"]) >= {"surrogate_accuracy", "fidelity", "defender_accuracy", "defense_l1_mean", "queries_used"}
    md = (out / "grid.md").read_text()
    assert "heuristic[beta=0.9]" in md and "none (undefended)" in md and "ε_eff" in md
    pngs = list((out / "plots").glob("*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:4] == b"\x89PNG"
    assert res.to_json() is res.report and "| defense |" in res.table()


def test_rerun_recomputes_nothing(tiny_grid, monkeypatch):
    cfg, out, _ = tiny_grid
    before = _mtimes(out / "cells")
    cells = _counting(monkeypatch, "run_cell")
    exports = _counting(monkeypatch, "run_export")
    res = run_grid(cfg, out, workers=1)
    assert cells == [] and exports == []
    assert res.report["counts"]["computed"] == 0 and res.report["counts"]["reused"] == 3 and res.passed
    assert _mtimes(out / "cells") == before


def test_deleting_a_cell_recomputes_exactly_that_cell(tiny_grid, tmp_path, monkeypatch):
    cfg, src, _ = tiny_grid
    out = tmp_path / "run"
    shutil.copytree(src, out)  # copy2 keeps the mtimes
    victim = json.loads((out / "grid.json").read_text())["cells"][2]["cell_id"]
    (out / "cells" / f"{victim}.json").unlink()
    before = _mtimes(out / "cells")
    cells = _counting(monkeypatch, "run_cell")
    exports = _counting(monkeypatch, "run_export")
    res = run_grid(cfg, out, workers=1)
    assert cells == [victim] and exports == []  # the cached defended ONNX is reused
    assert res.report["computed_cells"] == [victim] and res.report["counts"]["reused"] == 2
    after = _mtimes(out / "cells")
    assert {k: v for k, v in after.items() if k != f"{victim}.json"} == before and f"{victim}.json" in after


@pytest.mark.slow
def test_ray_backend_on_real_ray_matches_the_local_pool(tiny_grid, tmp_path):
    """The whole tiny grid again, on a real local Ray (ray.init(num_cpus=2)): the same cells, the same numbers."""
    ray = pytest.importorskip("ray")  # the dev extra installs it, so CI runs this
    cfg, src, _ = tiny_grid
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        res = run_grid(cfg, tmp_path / "ray", backend="ray")
    finally:
        ray.shutdown()
    assert res.passed and res.report["backend"] == "ray" and res.report["counts"]["computed"] == 3
    local = json.loads((src / "grid.json").read_text())
    assert [c["cell_id"] for c in res.report["cells"]] == [c["cell_id"] for c in local["cells"]]
    for cell in local["cells"]:
        a = json.loads((src / "cells" / f"{cell['cell_id']}.json").read_text())["result"]
        b = json.loads((tmp_path / "ray" / "cells" / f"{cell['cell_id']}.json").read_text())["result"]
        for key in ("surrogate_accuracy", "fidelity", "defender_accuracy", "queries_used"):
            assert b[key] == pytest.approx(a[key], abs=1e-9), (cell["cell_id"], key)
        assert b["defense_l1_mean"] == pytest.approx(a["defense_l1_mean"], abs=1e-6)


def test_ray_backend_without_ray_is_backend_unavailable(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, installed or not
    cfg = GridConfig.from_mapping(tiny_mapping(tiny_bundle))
    with pytest.raises(BackendUnavailable, match=r"pip install 'edgeguard\[dist\]'") as e:
        run_grid(cfg, tmp_path / "run", backend="ray")
    assert e.value.exit_code == 3 and not (tmp_path / "run").exists()
    with pytest.raises(BadInput, match="unknown grid backend"):
        run_grid(cfg, tmp_path / "run", backend="slurm")
    assert not (tmp_path / "run").exists()


def test_an_attack_restricted_to_some_defenses_runs_only_those_cells(tiny_grid, tmp_path, monkeypatch):
    cfg, src, _ = tiny_grid
    out = tmp_path / "run"
    shutil.copytree(src, out)
    mapping = tiny_mapping(cfg.victim.bundle)
    extra = {"method": "knockoff", "params": {"budget": 150, "epochs": 1, "query_options": {"n": 400}}, "defenses": []}
    cfg2 = GridConfig.from_mapping({**mapping, "attacks": [*mapping["attacks"], extra]})
    assert cfg2.attack_points()[1].defenses == ("none",)  # the baseline always runs
    cells = _counting(monkeypatch, "run_cell")
    res = run_grid(cfg2, out, workers=1)
    assert res.passed and len(cells) == 1  # the three cells of the first attack are reused
    assert res.report["counts"] == {"cells": 4, "done": 4, "computed": 1, "reused": 3, "failed": 0}
    rows = [r for r in res.report["summary"] if r["attack_params"]["budget"] == 150]
    assert [r["defense"] for r in rows] == ["none"] and rows[0]["queries_used"]["mean"] == 150


@pytest.mark.parametrize(
    "change, message",
    [
        ({"defenses": ["nonesuch"]}, "unknown defense 'nonesuch'"),
        ({"attacks": [{"method": "nonesuch"}]}, "unknown attack 'nonesuch'"),
        ({"defenses": [{"name": "heuristic", "params": {"betta": [0.5, 0.9]}}]}, "unknown parameter 'betta'"),
        ({"attacks": [{"method": "knockoff", "params": {"budget": 0}}]}, "budget must be a positive integer"),
        ({"attacks": [{"method": "knockoff", "params": {"budget": [100, -1]}}]}, "budget must be a positive integer"),
        ({"attacks": [{"method": "knockoff", "params": {"seed": 3}}]}, "seeds list"),
        ({"attacks": []}, "at least one attack"),
        ({"defenses": [{"name": "heuristic", "params": {"beta": []}}]}, "lists no values"),
        ({"defenses": ["heuristic", {"name": "heuristic", "params": {"beta": 0.7}}]}, "twice"),
        ({"seeds": []}, "no seed"),
        ({"workers": 0}, "workers must be at least 1"),
        ({"victim": {"bundle": "/nonexistent/bundle"}}, "not an edgeguard bundle"),
        ({"victim": {"bundle": "x", "model": {"arch": "smallcnn"}}}, "both bundle and model"),
        ({"eval": {"name": "nonesuch"}}, "unknown dataset 'nonesuch'"),
        ({"colour": "blue"}, "unknown parameter 'colour'"),
        ({"attacks": [{"method": "knockoff", "defenses": ["topk"]}]}, "which grid.defenses does not list"),
        ({"attacks": [{"method": "knockoff", "defenses": "heuristic"}]}, "must be a list of defense names"),
        ({"attacks": [{"method": "knockoff", "only": ["none"]}]}, "unknown key 'only'"),
    ],
)
def test_bad_config_is_refused_at_load_before_any_file(tiny_bundle, tmp_path, change, message):
    import yaml

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**tiny_mapping(tiny_bundle), **change}))
    with pytest.raises(BadInput, match=message) as e:
        GridConfig.load(path)
    assert e.value.exit_code == 2 and "\n" not in str(e.value) and str(e.value).startswith(f"config {path}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]


def test_run_folder_of_something_else_is_refused(tiny_bundle, tmp_path):
    out = tmp_path / "elsewhere"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BadInput, match="not an edgeguard grid run"):
        run_grid(GridConfig.from_mapping(tiny_mapping(tiny_bundle)), out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_sweeps_expand_to_their_product():
    from edgeguard.defenses.heuristic import HeuristicConfig

    pts = expand_sweep({"beta": [0.3, 0.7], "mode": ["reference", "textbook"], "nu": 500.0}, HeuristicConfig, "t")
    assert pts == [{"beta": 0.3, "mode": "reference", "nu": 500.0}, {"beta": 0.3, "mode": "textbook", "nu": 500.0},
                   {"beta": 0.7, "mode": "reference", "nu": 500.0}, {"beta": 0.7, "mode": "textbook", "nu": 500.0}]

    from dataclasses import dataclass

    @dataclass(frozen=True)
    class WithTuple:
        sizes: tuple[int, ...] = (1,)

    assert expand_sweep({"sizes": [1, 64]}, WithTuple, "t") == [{"sizes": [1, 64]}]  # a value, not a sweep
    assert expand_sweep({"sizes": [[1], [1, 64]]}, WithTuple, "t") == [{"sizes": [1]}, {"sizes": [1, 64]}]
    with pytest.raises(BadInput, match="twice"):
        expand_sweep({"beta": [0.5, 0.5]}, HeuristicConfig, "t")


def test_undefended_point_is_always_in_the_grid(tiny_bundle):
    cfg = GridConfig.from_mapping(tiny_mapping(tiny_bundle, defenses=[{"name": "topk", "params": {"k": [1, 2]}}]))
    assert [p.label for p in cfg.defense_points()] == ["none", "topk[k=1]", "topk[k=2]"]
    assert [p.label for p in cfg.attack_points()] == ["knockoff[budget=200,epochs=1,query_options={'n': 400}]"]


def test_default_grid_config_loads():
    from pathlib import Path

    cfg = GridConfig.load(Path(__file__).parents[1] / "configs" / "grid-default.yaml")
    assert cfg.victim.bundle is None and cfg.victim.model.arch == "smallcnn"
    assert [p.label for p in cfg.defense_points()][:3] == ["none", "heuristic[beta=0.5]", "heuristic[beta=0.9]"]
    assert len(cfg.defense_points()) * len(cfg.attack_points()) * len(cfg.seeds) >= 6


def test_verdicts_pair_each_defense_with_no_defense_at_equal_seeds():
    """summarize + the verdict table on a fixed table of cell results: the paired comparison is scipy's."""
    from scipy import stats as st

    from edgeguard.grid.config import AttackPoint, DefensePoint
    from edgeguard.grid.report import summarize, verdict_table

    seeds = (0, 1, 2, 3, 4, 5)
    fid = {"none": [0.52, 0.20, 0.89, 0.37, 0.53, 0.61], "strong": [0.31, 0.18, 0.62, 0.30, 0.50, 0.40],
           "weak": [0.55, 0.18, 0.90, 0.35, 0.50, 0.66], "helps": [0.55, 0.22, 0.93, 0.38, 0.56, 0.63]}
    acc = {"none": [0.99] * 6, "strong": [0.99] * 6, "weak": [0.97, 0.98, 0.97, 0.96, 0.98, 0.97], "helps": [0.99] * 6}
    dps = [DefensePoint("none", {}, {}), DefensePoint("strong", {"beta": 1}, {}), DefensePoint("weak", {}, {}),
           DefensePoint("helps", {}, {})]
    aps = [AttackPoint("knockoff", {"budget": 2000})]
    ids, records = {}, {}
    for di, d in enumerate(dps):
        for s in seeds:
            ids[di, 0, s] = f"{d.name}-{s}"
            records[f"{d.name}-{s}"] = {"result": {"fidelity": fid[d.name][s], "defender_accuracy": acc[d.name][s],
                                                   "surrogate_accuracy": 0.5, "defense_l1_mean": 0.1, "queries_used": 2000}}
    del records["weak-5"]  # an unfinished cell: the pairing uses the five seeds both rows have
    rows = summarize(dps, aps, seeds, ids, records)
    base, strong, weak, helps = rows
    assert helps["paired"]["verdict"] == "raises fidelity (helps the attacker)" and not helps["paired"]["lowers_fidelity"]
    assert base["paired"] is None and strong["paired"]["seeds"] == list(seeds) and weak["paired"]["seeds"] == [0, 1, 2, 3, 4]
    p = strong["paired"]["fidelity"]
    assert p["t_p"] == pytest.approx(st.ttest_rel(fid["strong"], fid["none"]).pvalue, abs=1e-6)
    assert p["perm_p"] == pytest.approx(2 / 64) and strong["paired"]["verdict"] == "lowers fidelity at no accuracy cost"
    assert weak["paired"]["verdict"] == "no significant effect on fidelity" and not weak["paired"]["lowers_fidelity"]
    assert weak["paired"]["no_accuracy_cost"] is False
    lo, hi = st.t.interval(0.95, 5, loc=sum(fid["none"]) / 6, scale=st.sem(fid["none"]))
    assert (base["fidelity"]["lo"], base["fidelity"]["hi"]) == pytest.approx((lo, hi), abs=1e-6)
    table = verdict_table(rows)
    assert "| strong | beta=1 | 6 | +0.0000 |" in table and "**yes**" in table and "| weak | - | 5 | +0.0180 |" in table
