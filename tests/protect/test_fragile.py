"""Fragile triggers (Yin et al. 2022, docs/fragile.md): the key, the generator, enrolment and verification on ONNX Runtime CPU, and the issue's bad inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from edgeguard.bundle import load_bundle
from edgeguard.cli import main
from edgeguard.errors import BadInput
from edgeguard.fileio import sha256_file
from edgeguard.protect.fragile import (
    FragileConfig,
    FragileStore,
    Generator,
    a_for_margin,
    generate,
    protect_fragile,
    row_variance,
    secret_key,
    verify_store,
)
from edgeguard.runtime import open_runner
from edgeguard.runtime.onnx_torch import OnnxModule, differentiable_copy

FAST = FragileConfig(steps=100)  # extended in chunks of 100 until every trigger carries its key


def test_key_and_variance_term():
    """F1, F2."""
    s = secret_key(100, 10)
    assert s[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1] and torch.bincount(s).tolist() == [10] * 10
    assert torch.bincount(secret_key(100, 100)).tolist() == [1] * 100
    assert float(row_variance(torch.full((4, 10), 0.1))) == 0.0
    assert float(row_variance(torch.eye(10))) == pytest.approx(0.09)
    p = torch.softmax(torch.randn(100, 10, dtype=torch.float64), 1)
    assert float(row_variance(p)) == pytest.approx(float(torch.var(p, unbiased=False)), rel=1e-7)


@pytest.mark.parametrize("m,margin", [(10, 0.2), (10, 0.86), (100, 0.5)])
def test_a_for_margin_puts_the_optimum_of_the_loss_at_that_margin(m, margin):
    """Minimise CE + a·Var numerically over rows (p_key, others equal) and find the requested margin."""
    a = a_for_margin(m, margin)
    p = np.linspace(1.0 / m + 1e-6, 1 - 1e-6, 400_001)
    q = (1 - p) / (m - 1)
    var = ((p - 1 / m) ** 2 + (m - 1) * (q - 1 / m) ** 2) / m
    best = np.argmin(-np.log(p) + a * var)
    assert math.log(p[best] / q[best]) == pytest.approx(margin, abs=2e-3)
    if m == 10 and margin == 0.86:
        assert a == pytest.approx(200, rel=0.01)  # the paper's CIFAR-10 setting


def test_generator_shape_params_determinism():
    """F3."""
    g = Generator(512, 3)
    assert abs(sum(p.numel() for p in g.parameters()) - 2.76e6) / 2.76e6 < 0.01
    outs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(0)
        g = Generator(512, 3)
        g.init_weights(gen)
        outs.append(g(torch.randn(100, 512, generator=gen)))
    assert outs[0].shape == (100, 3, 32, 32) and torch.equal(outs[0], outs[1])
    assert float(outs[0].detach().min()) >= 0 and float(outs[0].detach().max()) <= 1


@pytest.mark.parametrize("which", ["tiny_onnx", "tiny_int8"])
def test_differentiable_copy_matches_onnx_runtime(which, request, digits_test):
    """The generator's target: the artifact's own graph in PyTorch (QDQ as fake-quant) gives ONNX Runtime's outputs
    and a non-zero input gradient."""
    art = request.getfixturevalue(which)
    path = art if which == "tiny_onnx" else f"{art}/model.onnx"
    x = digits_test.tensors(0, 256)[0]
    model = differentiable_copy(path)
    with open_runner(path) as r:
        ref = r.predict(x.numpy())
    got = torch.softmax(model(x), 1).detach().numpy()
    if which == "tiny_onnx":
        assert np.abs(got - ref).max() < 1e-5 and (got.argmax(1) == ref.argmax(1)).all()
    else:  # an activation at a rounding boundary can land one quantization step away from ORT's: rare, small
        assert np.abs(got - ref).mean() < 1e-4 and np.abs(got - ref).max() < 0.05
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99
    xg = x[:4].clone().requires_grad_(True)
    model(xg).max(1).values.sum().backward()
    assert float(xg.grad.abs().sum()) > 0


def test_the_copy_leaks_gradient_through_relu_and_none_past_a_clamp():
    """Two backward rules for the owner's optimiser, forward values untouched (ONNX Runtime's): a relu whose input is
    negative passes 1% of the gradient (an all-off hidden layer is not a dead end), and a QuantizeLinear passes none
    where it clamped (pushing a saturated value further out does not help)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    scale, zp = numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.int8(0), "z")
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
         helper.make_node("Relu", ["d"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[scale, zp])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = torch.tensor([[-0.5, 0.3, 5.0, 20.0]], requires_grad=True)  # int8 at scale 0.1 clamps above 12.7
    y = OnnxModule(proto)(x)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.allclose(y.detach().numpy(), sess.run(None, {"x": x.detach().numpy()})[0])
    y.sum().backward()
    assert x.grad.tolist() == [[pytest.approx(0.01), 1.0, 1.0, 0.0]]
    onnx.checker.check_model(proto)


def test_differentiable_copy_refuses_unknown_operators(tiny_onnx):
    import onnx

    proto = onnx.load(str(tiny_onnx))
    proto.graph.node[1].op_type = "Hardmax"
    with pytest.raises(BadInput, match="Hardmax"):
        OnnxModule(proto)


@pytest.fixture(scope="module")
def enrolled(tiny_onnx, tmp_path_factory):
    """Triggers generated against the tiny FP32 ONNX and enrolled on it, in a fresh VAULT/fragile."""
    vault = tmp_path_factory.mktemp("fragile") / "vault"
    before = sha256_file(tiny_onnx)
    res = protect_fragile(tiny_onnx, vault / "fragile", FAST)
    assert sha256_file(tiny_onnx) == before  # the artifact is never touched
    return res, vault


@pytest.mark.slow  # two generations against the PyTorch model (about a minute and a half on 2 cores)
def test_generation_is_flat_and_leaves_the_model_untouched(tiny_bundle, digits_test):
    """F4, F5: AccTri 1.0, flat softmax for CE + a·Var, peaked for CE only; model state and predictions unchanged."""
    model = load_bundle(tiny_bundle).load_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = digits_test.tensors(0, len(digits_test))[0]
    with torch.no_grad():
        logits_before = model(x)
    full = generate(model, (1, 32, 32), 10, FAST.replace(n=50))
    cla = generate(model, (1, 32, 32), 10, FAST.replace(n=50, variant="cla"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), logits_before)  # bit-identical outputs: accuracy exactly unchanged
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert full.stats["acctri"] == 1.0 and cla.stats["acctri"] == 1.0
    assert full.stats["mean_top1_probability"] <= 0.2  # margin 0.2 -> key probability ~0.12 at the optimum
    assert cla.stats["mean_top1_probability"] >= 0.9
    assert full.images.dtype == torch.uint8 and full.images.shape == (50, 1, 32, 32)


def test_enrolled_onnx_is_intact_twenty_times(enrolled, tiny_onnx):
    """F8/F9 on ONNX Runtime CPU: >= 90 kept, 20 verifications intact, labels equal to the key."""
    res, vault = enrolled
    assert res.kept >= 90 and res.key_agreement >= 0.9 and res.check.verdict == "intact"
    store = FragileStore.find(vault)
    with open_runner(tiny_onnx) as r:
        for _ in range(20):
            v = verify_store(r, store)
            assert v.verdict == "intact" and v.acc_tri == 1.0 and v.hash_matches and not v.flipped


def test_one_epoch_of_last_layer_finetuning_is_detected(enrolled, tiny_bundle, tmp_path):
    """F10: fine-tune 1 epoch (last layer, SGD lr 1e-3), re-export: modified, with flipped triggers, exit 1."""
    from edgeguard.api import export_bundle
    from edgeguard.attacks import FinetuneConfig, finetune_attack

    _, vault = enrolled
    attacked = finetune_attack(tiny_bundle, tmp_path / "ft", FinetuneConfig(mode="ftll", epochs=1, lr=1e-3))
    path = export_bundle(attacked.bundle, tmp_path / "ft.onnx").path
    assert main(["verify", str(path), "--vault", str(vault), "--json", str(tmp_path / "v.json")]) == 1
    out = json.loads((tmp_path / "v.json").read_text())["fragile"]
    assert out["verdict"] == "modified" and out["acc_tri"] < 1.0 and out["flipped"] and not out["hash_matches"]
    assert out["note"].startswith("the artifact's sha256")  # the hash difference is said first


def test_int8_generation_against_fake_quant_and_drift(enrolled, tiny_int8, tmp_path):
    """F12: triggers generated against the QDQ graph keep their key on the INT8 artifact; F11: the FP32 enrolment run
    on the INT8 artifact is drift, not tampering."""
    res8 = protect_fragile(tiny_int8, tmp_path / "fragile", FAST.replace(n=30))
    assert res8.generation["surrogate"].endswith("(INT8 QDQ graph, fake-quant)")
    assert res8.key_agreement >= 0.9 and res8.kept >= 27 and res8.check.verdict == "intact"
    _, vault = enrolled
    with open_runner(tiny_int8) as r:
        v = verify_store(r, FragileStore.find(vault))
    assert v.verdict == "drift" and not v.passed and "not evidence of tampering" in v.note


def test_cli_protect_and_verify_with_a_watermark_vault(tiny_onnx, tmp_path, capsys):
    """protect fragile writes VAULT/fragile; verify runs each part the vault holds; JSON has acc_tri and verdict."""
    vault = tmp_path / "vault"
    assert main(["-q", "protect", "fragile", str(tiny_onnx), "--out", str(vault / "fragile"), "--n", "20", "--steps", "100",
                 "--repeats", "3", "--batch-sizes", "1,7,20", "--json", str(tmp_path / "p.json")]) == 0
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["kept"] >= 18 and p["check"]["verdict"] == "intact" and p["generation"]["config"]["n"] == 20
    assert main(["verify", str(tiny_onnx), "--vault", str(vault), "--json", str(tmp_path / "v.json")]) == 0
    v = json.loads((tmp_path / "v.json").read_text())
    assert "watermark" not in v and v["fragile"]["verdict"] == "intact" and v["fragile"]["acc_tri"] == 1.0
    assert "fragile INTACT" in capsys.readouterr().out


def test_tampered_record_and_foreign_vault_are_refused(enrolled, tiny_onnx, tmp_path, capsys):
    """An edited enrolment record (index re-hashed too) and a vault for another model: exit 2, one sentence."""
    import shutil

    from edgeguard.api import train_bundle
    from edgeguard.bundle import Vault
    from edgeguard.config import DataConfig, ModelConfig
    from edgeguard.training import TrainConfig

    _, vault = enrolled
    copy = tmp_path / "vault"
    shutil.copytree(vault, copy)
    store = FragileStore(copy / "fragile")
    name = next(n for n in store.vault.names() if n.startswith("enrol-"))
    rec = store.vault.get_json(name)
    rec["reference_labels"][0] = (rec["reference_labels"][0] + 1) % 10
    Vault(copy / "fragile").put_json(name, rec)  # a careful forger also fixes the index hash
    assert main(["verify", str(tiny_onnx), "--vault", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "was edited after enrolment" in err and "Traceback" not in err

    other = train_bundle(DataConfig("synthetic", options={"n": 64, "num_classes": 5, "channels": 1}), ModelConfig("smallcnn"),
                         TrainConfig(epochs=1), tmp_path / "five").bundle
    assert main(["verify", other, "--vault", str(vault)]) == 2
    err = capsys.readouterr().err
    assert "are for a 10-class model" in err and err.count("\n") == 1

    assert main(["verify", str(tiny_onnx), "--vault", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["verify", str(tiny_onnx), "--vault", str(tmp_path / "empty")]) == 2
    assert "neither a watermark nor a fragile enrolment" in capsys.readouterr().err


def test_protect_fragile_bad_inputs(tiny_onnx, tmp_path, capsys):
    assert main(["protect", "fragile", str(tiny_onnx)]) == 2  # an .onnx needs --out (its vault)
    assert "needs --out" in capsys.readouterr().err
    assert main(["protect", "fragile", str(tiny_onnx), "--out", str(tmp_path / "f"), "--key", "abc123"]) == 2
    assert "has no fragile key" in capsys.readouterr().err
    assert main(["protect", "fragile", str(tiny_onnx), "--out", str(tmp_path / "f"), "--batch-sizes", "x"]) == 2
    assert not (tmp_path / "f").exists()


@pytest.mark.slow
def test_sensitivity_full_generator_detects_one_epoch_in_19_of_20_trials(tiny_bundle):
    """Issue 8: after one epoch of last-layer fine-tuning (SGD lr 1e-3, the paper's attack), AccTri < 1.0 in >= 19/20
    seeded trials for CE + a·Var, and its mean AccTri is lower than the CE-only and untrained generators'."""
    from edgeguard.evaluate.sensitivity import SensitivityConfig, run_sensitivity

    res = run_sensitivity(tiny_bundle, SensitivityConfig(regimes=("last",), epochs=1, seeds=tuple(range(20))))
    rows = {r["variant"]: r for r in res.summary()}
    assert rows["full"]["detected_epoch1"] >= 19
    assert rows["full"]["acctri_epoch1_mean"] < rows["cla"]["acctri_epoch1_mean"] - 0.1
    assert rows["full"]["acctri_epoch1_mean"] < rows["non"]["acctri_epoch1_mean"] - 0.1


def test_generator_step_limit_follows_steps():
    """One rule for the fallback's step limit, in the config (the CLI and the pipeline pass only ``steps``)."""
    assert FragileConfig().step_limit == 3000
    assert FragileConfig(steps=5000).step_limit == 5000
    assert FragileConfig(steps=10, max_steps=20).step_limit == 20
    with pytest.raises(BadInput):
        FragileConfig(steps=10, max_steps=5)


def test_refinement_puts_the_triggers_a_stalled_generator_left_behind_on_their_key(tiny_bundle):
    """A generator stopped after 5 steps leaves most triggers off their key; without refinement that is an error,
    with it every trigger carries its key with a margin >= gamma/2 on the stored uint8 grid, and the refined
    triggers stay near the boundary (key probability far from 1)."""
    from edgeguard.errors import CheckFailed
    from edgeguard.protect.fragile.refine import _margins, _refine

    model = load_bundle(tiny_bundle).load_model()
    short = FragileConfig(n=20, steps=5, max_steps=5)
    with pytest.raises(CheckFailed, match="AccTri"):
        generate(model, (1, 32, 32), 10, short.replace(refine_steps=0))
    key = generate(model, (1, 32, 32), 10, short)
    assert key.stats["refined"]["triggers"] >= 5 and 0 < key.stats["refined"]["steps"] <= short.refine_steps
    assert key.stats["acctri"] == 1.0 and key.images.dtype == torch.uint8
    with torch.no_grad():
        logits = model(key.as_float())
    assert float(_margins(logits, key.key).min()) >= short.margin / 4
    assert key.stats["mean_top1_probability"] < 0.5
    again, info = _refine(model, key.images, key.key, short, short.weight(10), short.margin / 2, quiet=True)
    assert info["triggers"] == 0 and torch.equal(again, key.images)  # triggers already on their key are untouched


def test_triggers_an_enrolment_drops_are_refined_to_a_larger_margin(tiny_bundle):
    """What enrolment measures is the artifact's margin (after a fused head and the runtime), which can be far
    below the differentiable copy's: boost() takes the dropped triggers to twice the largest margin among them
    (factor 4), keeps their key, and leaves every other trigger bit-identical."""
    from edgeguard.protect.fragile import boost
    from edgeguard.protect.fragile.refine import _margins

    model = load_bundle(tiny_bundle).load_model()
    cfg = FragileConfig(n=20, steps=5, max_steps=5)
    key = generate(model, (1, 32, 32), 10, cfg)
    with torch.no_grad():
        m0 = _margins(model(key.as_float()), key.key)
    dropped = [int(i) for i in m0.argsort()[:4]]  # the four nearest a tie, as an enrolment would drop them
    boosted = boost(model, key, dropped, 10, cfg, 4.0)
    with torch.no_grad():
        m1 = _margins(model(boosted.as_float()), boosted.key)
    others = [i for i in range(20) if i not in dropped]
    assert torch.equal(boosted.images[others], key.images[others]) and torch.equal(boosted.key, key.key)
    assert float(m1[dropped].min()) >= 2 * float(m0[dropped].max()) * 0.99  # uint8 rounding of the kept image
    assert boosted.stats["boosted"][0]["triggers"] == 4 and boosted.sha256 != key.sha256
    assert boosted.stats["acctri"] == 1.0 and boosted.stats["margin_min"] == pytest.approx(float(m1.min()), abs=1e-5)


def test_a_key_class_the_model_cannot_reach_keeps_the_models_label_within_the_limit(tiny_bundle):
    """A classifier that never outputs class 9: the two triggers keyed 9 (of 20) keep the model's own label and are
    listed as rekeyed; with max_rekeyed 0 the same generation is refused."""
    from edgeguard.errors import CheckFailed

    base = load_bundle(tiny_bundle).load_model()

    class NoNine(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x) - 1e3 * torch.nn.functional.one_hot(torch.tensor(9), 10).float()

    cfg = FragileConfig(n=20, steps=50, max_steps=50, refine_steps=100)
    key = generate(NoNine(), (1, 32, 32), 10, cfg)
    assert key.stats["rekeyed"] == [9, 19] and key.stats["secret_key_agreement"] == pytest.approx(0.9)
    assert key.stats["acctri"] == 1.0 and 9 not in key.key.tolist()
    assert torch.equal(key.key[:9], secret_key(20, 10)[:9])
    with pytest.raises(CheckFailed, match="own label"):
        generate(NoNine(), (1, 32, 32), 10, cfg.replace(max_rekeyed=0.0))
