"""Golden outputs on CPU: record from ONNX Runtime, check the same, a perturbed and an INT8 artifact against it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeguard.bundle import Vault
from edgeguard.cli import main
from edgeguard.errors import BadInput
from edgeguard.evaluate.golden import (
    GoldenConfig,
    check_golden,
    compare_group,
    load_golden,
    record_golden,
    tolerance,
)
from edgeguard.protect.triggers import generate_triggers
from edgeguard.protect.watermark import VAULT_RECORD, VAULT_TRIGGERS
from edgeguard.runtime import open_runner


def _vault(tmp_path: Path, input_shape, num_classes: int, n: int = 20) -> Path:
    """A minimal owner vault holding a generated watermark key (read_key checks its sha256)."""
    key = generate_triggers(n, input_shape, num_classes, seed=3)
    v = Vault(tmp_path / "vault")
    v.put_tensors(VAULT_TRIGGERS, {"images": key.images, "labels": key.labels})
    v.put_json(VAULT_RECORD, {"key_sha256": key.sha256, "n": n, "num_classes": num_classes,
                              "input_shape": list(input_shape), "alpha": 1e-3, "source": "generated",
                              "renderer": key.renderer})
    return v.path


def _perturbed(src: Path, out: Path, scale: float = 0.05) -> Path:
    """The same graph with every float initializer of >= 2 dims shifted by seeded noise (a 'fine-tuned' copy)."""
    proto = onnx.load(str(src))
    rng = np.random.default_rng(0)
    for init in proto.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.ndim >= 2:
            init.CopyFrom(numpy_helper.from_array(w + scale * rng.standard_normal(w.shape).astype(np.float32), init.name))
    onnx.save(proto, str(out))
    return out


def test_tolerance_rules():
    assert tolerance("fp32", "fp32") == {"rule": "fp32", "atol": 1e-3, "min_top1": None}
    assert tolerance("fp32", "fp16")["atol"] == 1e-2
    assert tolerance("int8", "fp32") == {"rule": "int8", "atol": None, "min_top1": 0.99}
    assert tolerance("fp32", "int8+fp16")["rule"] == "int8"
    assert tolerance("fp32", "fp32", atol=0.5, min_top1=0.9) == {"rule": "fp32", "atol": 0.5, "min_top1": 0.9}


def test_compare_group_applies_both_bounds():
    ref = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], np.float32)
    got = ref.copy()
    got[2] = [0.4, 0.6]  # one flipped decision, |Δ| 0.2
    g = compare_group("x", ref, got, {"atol": None, "min_top1": 0.5})
    assert g.top1_agreement == pytest.approx(2 / 3) and g.max_abs_diff == pytest.approx(0.2) and g.passed
    assert not compare_group("x", ref, got, {"atol": None, "min_top1": 0.99}).passed
    assert not compare_group("x", ref, got, {"atol": 0.1, "min_top1": None}).passed
    assert compare_group("x", ref, ref, {"atol": 0.0, "min_top1": 1.0}).passed


def test_record_and_check_same_artifact(tiny_onnx, tmp_path):
    with open_runner(tiny_onnx) as r:
        shape, k = r.info.input_shape, r.info.num_classes
    vault = _vault(tmp_path, shape, k)
    g = tmp_path / "golden.npz"
    rec = record_golden(tiny_onnx, g, GoldenConfig(n=64), vault=vault)
    assert rec.groups == {"clean": 64, "watermark": 20}
    header, groups = load_golden(g)
    assert header["vault_triggers"] is True and header["artifact"]["backend"] == "onnxruntime"
    assert groups["clean"]["inputs"].shape == (64, *shape) and groups["clean"]["probs"].shape == (64, k)
    assert groups["watermark"]["inputs"].dtype == np.uint8 and len(groups["watermark"]["labels"]) == 20
    np.testing.assert_allclose(groups["clean"]["probs"].sum(1), 1.0, atol=1e-5)
    res = check_golden(tiny_onnx, g)
    assert res.passed and res.rule["rule"] == "fp32"
    assert [x.group for x in res.groups] == ["clean", "watermark"]
    assert all(x.max_abs_diff <= 1e-6 and x.top1_agreement == 1.0 for x in res.groups)


def test_record_includes_the_fragile_trigger_sets(tiny_onnx, tmp_path):
    """A vault with a fragile store: each enrolled trigger set becomes a group, run and compared like the others."""
    from edgeguard.protect.fragile import FragileConfig, protect_fragile

    vault = tmp_path / "vault"
    res = protect_fragile(tiny_onnx, vault / "fragile", FragileConfig(n=20, steps=100))
    g = tmp_path / "golden.npz"
    rec = record_golden(tiny_onnx, g, GoldenConfig(n=32), vault=vault)
    name = f"fragile-{res.trigger_sha256[:12]}"
    assert rec.groups == {"clean": 32, name: 20}  # no watermark in this vault
    _, groups = load_golden(g)
    assert groups[name]["inputs"].dtype == np.uint8
    assert (groups[name]["probs"].argmax(1) == groups[name]["labels"]).mean() >= 0.9  # triggers carry their key
    assert check_golden(tiny_onnx, g).passed


def test_bundle_agrees_with_its_export(tiny_bundle, tiny_onnx, tmp_path):
    g = tmp_path / "golden.npz"
    record_golden(tiny_onnx, g, GoldenConfig(n=128))
    res = check_golden(tiny_bundle, g)
    assert res.artifact["backend"] == "torch" and res.rule["atol"] == 1e-3
    assert res.passed, res.summary()


def test_perturbed_artifact_fails(tiny_onnx, tmp_path):
    g = tmp_path / "golden.npz"
    record_golden(tiny_onnx, g, GoldenConfig(n=128))
    bad = _perturbed(tiny_onnx, tmp_path / "tuned.onnx")
    res = check_golden(bad, g)
    assert not res.passed
    assert res.groups[0].max_abs_diff > 1e-3


def test_int8_uses_top1_rule(tiny_int8, tiny_onnx, tmp_path):
    g = tmp_path / "golden.npz"
    record_golden(tiny_onnx, g, GoldenConfig(n=256))
    res = check_golden(tiny_int8, g)
    assert res.artifact["precision"] == "int8" and res.rule == {"rule": "int8", "atol": None, "min_top1": 0.99}
    clean = res.groups[0]
    assert clean.max_abs_diff > 0  # INT8 rounding moves the probabilities
    assert res.passed == (clean.top1_agreement >= 0.99)


def test_cli_golden_and_check(capsys, tiny_onnx, tmp_path):
    g, j = tmp_path / "g.npz", tmp_path / "check.json"
    assert main(["golden", str(tiny_onnx), "--out", str(g), "--n", "32"]) == 0
    assert main(["golden-check", str(tiny_onnx), str(g), "--json", str(j)]) == 0
    out = json.loads(j.read_text())
    assert out["passed"] and out["groups"][0]["n"] == 32
    bad = _perturbed(tiny_onnx, tmp_path / "tuned.onnx")
    capsys.readouterr()
    assert main(["golden-check", str(bad), str(g), "--json", str(j)]) == 1
    assert "FAIL" in capsys.readouterr().out and json.loads(j.read_text())["passed"] is False
    # a loose enough tolerance passes the same artifact: the bound is what decides
    assert main(["golden-check", str(bad), str(g), "--atol", "1.0"]) == 0


def test_cli_golden_bad_input(capsys, tiny_onnx, tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for args in (["golden-check", tiny_onnx, tmp_path / "missing.npz"],
                 ["golden-check", tiny_onnx, tmp_path / "junk.npz"],
                 ["golden", tiny_onnx, "--out", tmp_path / "g.txt"],
                 ["golden", tiny_onnx, "--out", tmp_path / "g.npz", "--vault", tmp_path / "novault"]):
        capsys.readouterr()
        rc = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert err.startswith("edgeguard: error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g.npz").exists()
    with pytest.raises(BadInput, match="at least 1"):
        GoldenConfig(n=0)
