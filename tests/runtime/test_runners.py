"""Runners: dispatch, input validation (once, in the base class), info read from the artifact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeguard.errors import BackendUnavailable, BadInput
from edgeguard.runtime import open_runner
from edgeguard.runtime.base import Runner, RunnerInfo


def test_dispatch_and_info(tiny_bundle, tiny_onnx):
    with open_runner(tiny_bundle) as tb, open_runner(tiny_onnx) as to:
        assert (tb.info.backend, to.info.backend) == ("torch", "onnxruntime")
        for info in (tb.info, to.info):
            assert info.input_shape == (1, 32, 32)
            assert info.classes == tuple(str(i) for i in range(10))
            assert info.precision == "fp32" and info.defense == "none"
            assert len(info.sha256) == 64
        # the ONNX file records which bundle it came from
        assert dict(to.info.details)["source_sha256"] == tb.info.sha256


def test_uint8_and_float_inputs_agree(tiny_onnx, digits_test):
    x, _ = digits_test.tensors(0, 16)
    x8 = (x * 255).round().to(torch.uint8)
    with open_runner(tiny_onnx) as r:
        p8 = r.predict(x8.numpy())
        pf = r.predict(x8.float().numpy() / 255.0)
        np.testing.assert_allclose(p8, pf, atol=1e-6)
        assert p8.dtype == np.float32 and p8.shape == (16, 10)
        np.testing.assert_allclose(p8.sum(1), 1.0, atol=1e-5)
        # a single CHW image is accepted as a batch of one
        assert r.predict(x[0]).shape == (1, 10)


def test_batching_inside_the_runner_is_invisible(tiny_bundle, digits_test):
    x, _ = digits_test.tensors(0, 70)
    with open_runner(tiny_bundle) as r:
        np.testing.assert_allclose(r.predict(x, batch_size=7), r.predict(x, batch_size=256), atol=1e-6)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 3, 32, 32), np.float32), r"does not match .*model\.onnx.s N x 1x32x32"),
        (np.zeros((2, 1, 28, 28), np.float32), r"does not match .*model\.onnx.s N x 1x32x32"),
        (np.zeros((32, 32), np.float32), "N x C x H x W"),
        (np.full((1, 1, 32, 32), 2.0, np.float32), r"must lie in \[0, 1\]"),
        (np.full((1, 1, 32, 32), np.nan, np.float32), r"must lie in \[0, 1\]"),
        (np.zeros((1, 1, 32, 32), np.int32), "uint8"),
    ],
    ids=["channels", "size", "rank", "range", "nan", "dtype"],
)
def test_bad_inputs_are_one_sentence(tiny_onnx, bad, match):
    with open_runner(tiny_onnx) as r, pytest.raises(BadInput, match=match):
        r.predict(bad)


def test_bad_paths(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        open_runner(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage" * 20)
    with pytest.raises(BadInput, match="not a valid ONNX model"):
        open_runner(tmp_path / "junk.onnx")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(BadInput, match="expected a bundle folder"):
        open_runner(tmp_path / "x.txt")
    (tmp_path / "m.engine").write_bytes(b"plan")
    with pytest.raises(BackendUnavailable, match="TensorRT"):
        open_runner(tmp_path / "m.engine")


def test_unavailable_provider_is_exit_3(tiny_onnx):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA provider present")
    with pytest.raises(BackendUnavailable, match="provider 'cuda'"):
        open_runner(tiny_onnx, providers=["cuda"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_third_party_onnx_with_logits_gets_softmax(tmp_path):
    """An ONNX file without edgeguard metadata that outputs logits still yields probabilities."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).eval()
    path = tmp_path / "plain.onnx"
    torch.onnx.export(net, (torch.rand(1, 3, 8, 8),), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    x = torch.rand(5, 3, 8, 8)
    with open_runner(path) as r:
        assert r.info.input_shape == (3, 8, 8) and r.info.num_classes == 4
        np.testing.assert_allclose(r.predict(x.numpy()), torch.softmax(net(x), 1).detach().numpy(), atol=1e-6)


def test_base_runner_checks_output_shape(tmp_path):
    class Wrong(Runner):
        def _open_impl(self):
            return RunnerInfo("fake", "fp32", "none", (1, 2, 2), ("a", "b"), "0" * 64, str(self.path))

        def _predict_impl(self, x):
            return np.zeros((len(x), 3), np.float32)

    with pytest.raises(BadInput, match="returned shape"):
        Wrong(tmp_path).predict(np.zeros((2, 1, 2, 2), np.float32))


def test_every_runner_carries_a_typed_defense_record(tiny_bundle, tiny_onnx, tmp_path):
    """One record, filled by each runner (graph metadata, a host module, a foreign server), read by every check."""
    import sys
    from pathlib import Path

    from edgeguard.api import export_bundle
    from edgeguard.runtime.base import DefenseRecord

    d = export_bundle(tiny_bundle, tmp_path / "h.onnx", defense="heuristic", defense_params={"beta": 0.6}).path
    with open_runner(d) as r, open_runner(d, undefended=True) as clean, open_runner(tiny_bundle) as b:
        assert r.info.defense_record.name == "heuristic" and r.info.defense_record.params["beta"] == 0.6
        assert r.info.defense_record.placement == "graph" and r.info.to_json()["defense_record"]["name"] == "heuristic"
        assert clean.info.defense_record == DefenseRecord() and b.info.defense_record == DefenseRecord()
    sys.path.insert(0, str(Path(__file__).parents[1] / "faults"))
    from oip_server import OipServer

    with OipServer("ok") as srv, open_runner(srv.url) as remote:
        assert remote.info.defense == "unknown" and remote.info.defense_record.placement == "unknown"
