"""Host-side defenses: the undefended graph plus a hash-pinned state file, served by HostDefenseRunner so every
check queries them like a fused defense."""

from __future__ import annotations

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
    assert res.placement == "host" and res.sidecar == str(out.with_suffix(".defense.pt"))
    return out


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
    import shutil

    graph = tmp_path / "m.onnx"  # the graph names its state file (model.defense.pt): renaming the graph keeps it
    shutil.copy(mad_onnx, graph)
    with pytest.raises(BadInput, match="state file model.defense.pt is missing"):
        open_runner(graph)
    shutil.copy(mad_onnx.with_suffix(".defense.pt"), tmp_path / "model.defense.pt")
    graph2 = tmp_path / "model.onnx"
    shutil.copy(mad_onnx, graph2)
    with open_runner(graph2) as r:
        assert r.info.defense == "mad"
    data = bytearray((tmp_path / "model.defense.pt").read_bytes())
    data[-40] ^= 0xFF
    (tmp_path / "model.defense.pt").write_bytes(bytes(data))
    with pytest.raises(BadInput, match="was modified"):
        open_runner(graph2)
    with pytest.raises(BadInput, match="was modified"):
        open_runner(graph)  # the renamed graph now finds the state file, and the hash check still runs


def test_lp_modelguard_w_runs_on_the_host(tiny_bundle, tmp_path, digits_test):
    pytest.importorskip("pulp")
    out = tmp_path / "w.onnx"
    res = export_bundle(tiny_bundle, out, defense="modelguard_w", defense_params={"solver": "lp", "epsilon": 0.3})
    assert res.placement == "host"
    x, _ = digits_test.tensors(0, 20)
    with open_runner(out) as r, open_runner(out, undefended=True) as clean:
        q, p = r.predict(x), clean.predict(x)
    assert (q.argmax(1) == p.argmax(1)).all() and np.all(np.abs(q - p).sum(1) <= 0.3 + 1e-5)
