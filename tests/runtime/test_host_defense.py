"""Host-side defenses: the undefended graph plus a hash-pinned, content-named state file, served by
HostDefenseRunner so every check queries them like a fused defense."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from edgeguard.api import defense_context, export_bundle
from edgeguard.bundle import load_bundle
from edgeguard.defenses import make_defense
from edgeguard.errors import BadInput
from edgeguard.runtime import open_runner
from edgeguard.runtime.defended import HostDefenseRunner


@pytest.fixture(scope="module")
def mad_onnx(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("host") / "model.onnx"
    res = export_bundle(tiny_bundle, out, defense="mad", defense_params={"epsilon": 0.5, "jacobian": "closed_form"})
    assert res.placement == "host" and res.head_check_max_abs_diff is None
    side = sorted(out.parent.glob("model.defense.*.pt"))
    assert [str(p) for p in side] == [res.sidecar]
    return out


def _side(graph):
    return next(graph.parent.glob(f"{graph.stem}.defense.*.pt"))


def test_host_defense_is_served_through_the_wrapper(mad_onnx, tiny_bundle, digits_test):
    x, _ = digits_test.tensors(0, 200)
    with open_runner(mad_onnx) as r, open_runner(mad_onnx, undefended=True) as clean:
        assert isinstance(r, HostDefenseRunner) and r.info.defense == "mad" and clean.info.defense == "none"
        q, p = r.predict(x), clean.predict(x)
    l1 = np.abs(q - p).sum(1)
    assert np.allclose(l1, 0.5, atol=1e-4)  # MAD spends exactly its budget (alpha < 1 here)
    assert (q.argmax(1) == p.argmax(1)).all()  # argmax oracle
    # the same output as the PyTorch module built from the bundle with the same seed
    module = make_defense("mad", {"epsilon": 0.5, "jacobian": "closed_form"}, defense_context(load_bundle(tiny_bundle)))
    with torch.no_grad():
        ref = module(torch.log(torch.from_numpy(np.maximum(p, 1e-30))), x).numpy()
    assert np.abs(ref - q).max() < 1e-4


def test_missing_or_modified_state_file_is_refused(mad_onnx, tmp_path):
    graph = tmp_path / "m.onnx"  # the graph names its state file, so a renamed graph still finds it
    shutil.copy(mad_onnx, graph)
    side = _side(mad_onnx)
    with pytest.raises(BadInput, match=f"state file {side.name} is missing"):
        open_runner(graph)
    shutil.copy(side, tmp_path / side.name)
    with open_runner(graph) as r:
        assert r.info.defense == "mad"
    data = bytearray((tmp_path / side.name).read_bytes())
    data[-40] ^= 0xFF
    (tmp_path / side.name).write_bytes(bytes(data))
    with pytest.raises(BadInput, match="was modified"):
        open_runner(graph)


def test_reexport_keeps_one_state_file_and_a_failed_write_keeps_the_old_pair(tiny_bundle, tmp_path, monkeypatch):
    out = tmp_path / "model.onnx"
    export_bundle(tiny_bundle, out, defense="mad", defense_params={"jacobian": "closed_form", "seed": 1})
    first = _side(out)
    export_bundle(tiny_bundle, out, defense="mad", defense_params={"jacobian": "closed_form", "seed": 2})
    assert [p.name for p in tmp_path.glob("model.defense.*.pt")] == [_side(out).name] != [first.name]
    before = out.read_bytes()

    import edgeguard.export.onnx as onnx_mod

    real = onnx_mod.atomic_write

    def failing(path, writer):
        if str(path).endswith(".onnx"):
            raise OSError("disk full")
        return real(path, writer)

    monkeypatch.setattr(onnx_mod, "atomic_write", failing)
    with pytest.raises(OSError):
        export_bundle(tiny_bundle, out, defense="mad", defense_params={"jacobian": "closed_form", "seed": 3})
    monkeypatch.undo()
    assert out.read_bytes() == before and len(list(tmp_path.glob("model.defense.*.pt"))) == 1
    with open_runner(out) as r:  # the previous pair still opens
        assert r.info.defense == "mad"
    export_bundle(tiny_bundle, out, defense="heuristic")  # a fused defense removes the stale state file
    assert not list(tmp_path.glob("model.defense.*.pt"))


def test_undefended_view_needs_an_onnx_graph(tiny_bundle):
    with pytest.raises(BadInput, match="only an exported .onnx file"):
        open_runner(tiny_bundle, undefended=True)


def test_lp_modelguard_w_runs_on_the_host(tiny_bundle, tmp_path, digits_test):
    pytest.importorskip("pulp")
    out = tmp_path / "w.onnx"
    res = export_bundle(tiny_bundle, out, defense="modelguard_w", defense_params={"solver": "lp", "epsilon": 0.3})
    assert res.placement == "host"
    x, _ = digits_test.tensors(0, 20)
    with open_runner(out) as r, open_runner(out, undefended=True) as clean:
        q, p = r.predict(x), clean.predict(x)
    assert (q.argmax(1) == p.argmax(1)).all()
    l1 = np.abs(q - p).sum(1)
    top2 = np.sort(p, 1)[:, -2:]
    solvable = top2[:, 1] - top2[:, 0] >= 1e-4
    assert solvable.all() and np.allclose(l1[solvable], 0.3, atol=1e-4)  # the LP spends its whole budget
