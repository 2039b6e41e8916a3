"""Misbehaving servers: a table of Open Inference Protocol servers that answer slowly, never, half, too much, wrongly
or as someone else, driven by a small in-test server on 127.0.0.1 (tests/faults/oip_server.py).  Each case ends
within its deadline (asserted with a generous bound), exits with the documented code, and prints one line."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from edgeguard.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from oip_server import OipServer  # noqa: E402

REMOTE, BAD = 4, 2  # exit codes: the server failed / the answer breaks the output contract

CASES = [
    # behaviour, extra argv, exit code, words in the one line, seconds allowed
    ("trickle", ["--timeout", "2"], REMOTE, "did not answer an inference request within 2 s", 8),
    ("never", ["--timeout", "2"], REMOTE, "did not answer an inference request within 2 s", 8),
    ("closes_mid_body", [], REMOTE, "closed the connection after", 8),
    ("huge", [], REMOTE, "more than the 64 MiB allowed", 8),
    ("nan", [], BAD, "row 1 is not finite", 8),
    ("negative", [], BAD, "row 2 has a negative entry", 8),
    ("unnormalised", [], BAD, "row 0 sums to", 8),
    ("logits", [], BAD, "pass --outputs logits", 8),
    ("bytes_declared", [], BAD, "declares its output 'y' as BYTES", 8),
    ("wrong_dtype", [], BAD, "answered FP64 where its metadata declares FP32", 8),
    ("wrong_shape", [], BAD, "answered shape [32, 9]", 8),
    ("redirect", [], REMOTE, "redirects are not followed", 8),
    ("malformed_json", [], REMOTE, "malformed JSON", 8),
    ("error_500", [], REMOTE, "HTTP 500: internal failure", 8),
    ("disappears", [], REMOTE, "disappeared from the server", 8),
    ("metadata_changes", [], REMOTE, "changed mid-run", 8),
]


@pytest.mark.parametrize("behaviour, argv, code, words, bound", CASES, ids=[c[0] for c in CASES])
def test_a_misbehaving_server_ends_in_time_with_one_line(behaviour, argv, code, words, bound, capsys):
    with OipServer(behaviour) as srv:
        t0 = time.monotonic()
        rc = main(["evaluate", srv.url + "?retries=1&backoff=0.05", *argv])
        took = time.monotonic() - t0
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert rc == code, (rc, err)
    assert len(err) == 1 and words in err[0], err
    assert "Traceback" not in captured.err + captured.out
    assert took < bound, took


def test_an_honest_server_passes_and_a_logits_server_passes_with_outputs_logits(capsys):
    with OipServer("ok") as srv:
        assert main(["evaluate", srv.url]) == 0
    with OipServer("logits") as srv:
        assert main(["evaluate", srv.url, "--outputs", "logits", "--json", "/dev/null"]) == 0
        assert srv.infers == 17  # 540 digits in batches of max_batch_size 32


def test_the_whole_check_has_a_deadline(capsys):
    with OipServer("trickle") as srv:
        t0 = time.monotonic()
        rc = main(["evaluate", srv.url, "--timeout", "30", "--deadline", "1.5"])
        took = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == REMOTE and len(err) == 1 and "within its deadline of 1.5 s (--deadline)" in err[0], err
    assert took < 6


def test_unreachable_is_its_own_exit_code(capsys):
    from edgeguard.serve import free_ports

    rc = main(["evaluate", f"http://127.0.0.1:{free_ports(1)[0]}/v2/models/m?retries=1&backoff=0.05", "--timeout", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == REMOTE and len(err) == 1 and "cannot reach" in err[0] and "after 2 attempt(s)" in err[0], err


def test_a_third_party_onnx_is_held_to_the_same_contract(tmp_path):
    """Probed as returning probabilities (random images), it answers a white image with negative 'probabilities'."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from edgeguard.errors import OutputContractError
    from edgeguard.runtime import open_runner

    w = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["img"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["z"]),
        helper.make_node("Softmax", ["z"], ["p"], axis=1),
        helper.make_node("ReduceMean", ["flat"], ["m"], axes=[1], keepdims=1),
        helper.make_node("Greater", ["m", "thr"], ["bright"]),
        helper.make_node("Cast", ["bright"], ["b"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["b", "half"], ["shift"]),
        helper.make_node("Sub", ["p", "shift"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes, "trap", [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel()), helper.make_tensor("thr", TensorProto.FLOAT, [], [0.9]),
         helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])])
    path = tmp_path / "trap.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with open_runner(path) as r:
        assert r.outputs_detected == "probabilities"
        assert r.predict(np.random.default_rng(1).random((4, 1, 4, 4), dtype=np.float32)).shape == (4, 3)
        x = np.random.default_rng(2).random((4, 1, 4, 4), dtype=np.float32)
        x[2] = 1.0
        with pytest.raises(OutputContractError, match="row 2 has a negative entry"):
            r.predict(x)
