"""Bring your own model: classifiers defined outside the registry (tests/byom_models.py), imported from a factory
plus a state dict or from a torch.export program, then protected, quantized, exported, attacked and verified."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from edgeguard.bundle import load_bundle
from edgeguard.cli import main
from edgeguard.config import DataConfig
from edgeguard.errors import BadInput
from edgeguard.importing import import_model
from edgeguard.models.imported import find_head

sys.path.insert(0, str(Path(__file__).parent))
import byom_models as bm  # noqa: E402

FACTORY = str(Path(__file__).parent / "byom_models.py")


@pytest.mark.parametrize("name, head", [("resnet", "fc"), ("vgg", "classifier.4"), ("vit", "head")])
def test_the_head_is_found_in_each_layout(name, head):
    assert find_head(getattr(bm, name)(), 10) == head


def test_a_head_that_cannot_be_found_says_how_to_name_it():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 12), torch.nn.Softmax(1))
    with pytest.raises(BadInput, match=r"--head ATTR\.PATH"):
        find_head(net, 10)
    assert find_head(net, 12) == "1"
    with pytest.raises(BadInput, match="has 12 outputs but the model has 10"):
        find_head(net, 10, "1")


def test_factory_and_state_dict_rebuild_the_users_network(tmp_path):
    user = bm.resnet().eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in user.state_dict().items()}}, tmp_path / "w.pth")
    res = import_model(f"{FACTORY}:resnet", out=tmp_path / "b", weights=tmp_path / "w.pth", data=DataConfig(),
                       mean=bm.DIGITS_MEAN, std=bm.DIGITS_STD)
    assert res.kind == "factory" and res.head == "fc" and "prefix 'module.' removed" in res.weights
    model = load_bundle(res.bundle).load_model()
    x = torch.rand(6, 1, 32, 32)
    with torch.no_grad():
        want = user((x - bm.DIGITS_MEAN[0]) / bm.DIGITS_STD[0])
        assert torch.allclose(model(x), want, atol=1e-5)
    heads = [n for n, _ in model.named_parameters() if model.is_head_parameter(n)]
    assert heads == ["net.module.fc.weight", "net.module.fc.bias"]
    before = {n: p.clone() for n, p in model.named_parameters()}
    model.reset_classifier(generator=torch.Generator().manual_seed(0))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(heads)


def test_safetensors_weights(tmp_path):
    from safetensors.torch import save_file

    user = bm.vgg().eval()
    save_file(user.state_dict(), tmp_path / "w.safetensors")
    res = import_model(f"{FACTORY}:vgg", out=tmp_path / "b", weights=tmp_path / "w.safetensors", input_shape=(1, 32, 32),
                       classes=10)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(load_bundle(res.bundle).load_model()(x), user(x), atol=1e-5)


def test_a_module_object_is_stored_as_a_program_that_travels_and_is_hash_checked(tmp_path):
    user = bm.vit().eval()
    res = import_model(user, out=tmp_path / "b", data=DataConfig())
    b = load_bundle(res.bundle)
    assert res.kind == "program" and "program.pt2" in b.manifest["files"] and res.head == "head"
    x = torch.rand(5, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(b.load_model()(x), user(x), atol=1e-5)
    assert main(["-q", "attack", "finetune", str(b.path), "--mode", "rtll", "--epochs", "1",
                 "--out", str(tmp_path / "a")]) == 0
    attacked = load_bundle(tmp_path / "a")
    assert attacked.manifest["files"]["program.pt2"] == b.manifest["files"]["program.pt2"]
    sd0, sd1 = b.state_dict(), attacked.state_dict()
    assert not torch.equal(sd0["net.module.head.weight"], sd1["net.module.head.weight"])
    assert torch.equal(sd0["net.module.patch_embed.weight"], sd1["net.module.patch_embed.weight"])  # RTLL: head only
    with open(tmp_path / "a" / "program.pt2", "ab") as f:
        f.write(b"\0")
    assert main(["-q", "info", str(tmp_path / "a")]) == 2


def test_a_model_ending_in_softmax_is_taken_as_probabilities(tmp_path):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 10), torch.nn.Softmax(1)).eval()
    res = import_model(net, out=tmp_path / "b", input_shape=(1, 32, 32), classes=10)
    assert res.outputs == "probabilities" and not res.head_is_last
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(torch.softmax(load_bundle(res.bundle).load_model()(x), 1), net(x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name, source", [("resnet", "factory"), ("vgg", "factory"), ("vit", "pt2")])
def test_the_whole_chain_on_an_imported_model(name, source, tmp_path):
    torch.manual_seed(0)  # the user's init; without it, it depended on the tests run before (10 inits: docs/fragile.md)
    user = bm.train_user_model(getattr(bm, name)())
    norm = ["--mean", str(bm.DIGITS_MEAN[0]), "--std", str(bm.DIGITS_STD[0]), "--dataset", "digits"]
    if source == "factory":
        torch.save(user.state_dict(), tmp_path / "w.pt")
        argv = [f"{FACTORY}:{name}", "--weights", str(tmp_path / "w.pt")]
    else:
        ep = torch.export.export(user, (torch.rand(2, 1, 32, 32),), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(ep, tmp_path / "m.pt2")
        argv = [str(tmp_path / "m.pt2")]
    t = tmp_path
    run = lambda *a: main(["-q", *map(str, a)])  # noqa: E731
    assert run("import", *argv, *norm, "--out", t / "base") == 0
    assert run("import", *argv, *norm, "--out", t / "unmarked") == 0
    assert run("protect", "watermark", t / "base", "--out", t / "marked") == 0
    assert run("protect", "magicguard", t / "marked", "--out", t / "guarded", "--a", "0.001") == 0
    assert run("quantize", t / "guarded", "--mode", "qat", "--out", t / "int8") == 0
    assert run("export", t / "int8", "--defense", "heuristic", "--out", t / "d.onnx") == 0
    assert run("protect", "fragile", t / "d.onnx", "--out", t / "marked" / "vault" / "fragile", "--n", "20",
               "--repeats", "2") == 0
    assert run("verify", t / "d.onnx", "--vault", t / "marked" / "vault", "--json", t / "v.json") == 0
    v = json.loads((t / "v.json").read_text())
    assert v["watermark"]["verdict"] == "present" and v["fragile"]["verdict"] == "intact"
    from edgeguard.serve import ServeConfig, ServerProcess, free_ports

    http, grpc, metrics = free_ports(3)
    srv = ServerProcess(t / "d.onnx", ServeConfig(name="m", http_port=http, grpc_port=grpc, metrics_port=metrics))
    try:
        assert run("verify", srv.ready["http"], "--vault", t / "marked" / "vault", "--timeout", "20",
                   "--json", t / "s.json") == 0
    finally:
        srv.stop(kill_after=20)
    s = json.loads((t / "s.json").read_text())
    assert s["watermark"]["matches"] == v["watermark"]["matches"] and s["fragile"]["verdict"] == "intact"
    assert run("attack", "finetune", t / "marked", "--mode", "rtal", "--epochs", "2", "--out", t / "stolen") == 0
    rc = run("verify", t / "stolen", "--vault", t / "marked" / "vault", "--json", t / "r.json")
    r = json.loads((t / "r.json").read_text())
    assert rc == (0 if r["passed"] else 1) and r["watermark"]["n"] == 100  # the verdict after RTAL is the measurement
    assert run("verify", t / "unmarked", "--vault", t / "marked" / "vault", "--json", t / "u.json") == 1
    assert json.loads((t / "u.json").read_text())["watermark"]["verdict"] == "absent"


def test_a_pipeline_config_imports_instead_of_training(tmp_path):
    """``import:`` replaces the training stage; the rest of the pipeline runs on the user's model, including a host-side
    defense (MAD), whose state file rebuilds the imported architecture from its record where the graph is served."""
    from edgeguard.pipeline import PipelineConfig, run_pipeline
    from edgeguard.runtime import open_runner

    user = bm.train_user_model(bm.resnet())
    torch.save(user.state_dict(), tmp_path / "w.pt")
    cfg_path = tmp_path / "byom.yaml"
    cfg_path.write_text(f"""
name: byom
data: {{name: digits}}
import:
  source: {FACTORY}:resnet
  weights: {tmp_path / 'w.pt'}
  mean: [{bm.DIGITS_MEAN[0]}]
  std: [{bm.DIGITS_STD[0]}]
quantize: {{enabled: true, mode: ptq, target: cpu, calib_samples: 128, max_accuracy_drop: 0.02}}
export:
  defense: [heuristic, {{name: mad, params: {{jacobian: closed_form}}}}]
  defense_latency_iterations: 2
evaluate: {{min_accuracy: 0.6}}
bench: {{batch_sizes: [1], warmup: 1, iterations: 2}}
""")
    res = run_pipeline(PipelineConfig.load(cfg_path), tmp_path / "run")
    report = res.report
    assert "train" not in report["results"] and report["results"]["import"]["head"] == "fc"
    assert report["results"]["import"]["source"].endswith("byom_models.py:resnet")
    assert res.passed, [c for c in report["checks"] if not c["passed"]]
    assert load_bundle(report["artifacts"]["bundle"]).manifest["arch"] == "imported"
    mad = tmp_path / "run" / "defenses" / "01_mad.onnx"
    with open_runner(mad) as r:
        assert r.info.defense == "mad"
        p = r.predict(torch.rand(4, 1, 32, 32).numpy())
    assert p.shape == (4, 10) and abs(float(p.sum(1).mean()) - 1) < 1e-4
    assert "## Imported model" in (tmp_path / "run" / "report.md").read_text()


def test_a_pipeline_config_names_either_a_model_or_an_import(tmp_path):
    from edgeguard.pipeline import PipelineConfig

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{arch: smallcnn}}\nimport: {{source: {FACTORY}:resnet}}\n")
    with pytest.raises(BadInput, match="either trains a model .model. or imports one"):
        PipelineConfig.load(cfg)
    cfg.write_text("import: {weights: w.pt}\n")
    with pytest.raises(BadInput, match="import needs a source"):
        PipelineConfig.load(cfg)
