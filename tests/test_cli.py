"""The CLI end to end: ``edgeguard.cli.main(argv)`` in-process (exit code, stdout, stderr, --json), plus
real ``python -m edgeguard`` subprocesses for the console entry.

Contract (DESIGN.md, "CLI contract"): exit 0 success, 1 a check failed, 2 bad usage or input, 3 a needed
optional backend is missing; an error is one sentence on stderr, never a traceback.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeguard.cli import main


def run(capsys, *args) -> tuple[int, str, str]:
    """``main([...])`` in-process; (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def user_error(rc: int, err: str, code: int = 2) -> str:
    """Assert an edgeguard error: the exit code and one ``edgeguard: error:`` line; returns the message."""
    assert rc == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("edgeguard: error: ")
    return lines[0]


def usage_error(rc: int, err: str) -> str:
    """Assert a click usage error: exit 2 and click's ``Error:`` line last; returns that line."""
    assert rc == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("Error: ")
    return last


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def rehash(bundle: Path) -> None:
    """Record model.pt's current sha256 in the manifest, so only the content checks can refuse it."""
    m = load(bundle / "manifest.json")
    data = (bundle / "model.pt").read_bytes()
    m["files"]["model.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (bundle / "manifest.json").write_text(json.dumps(m))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- train ---------------------------------------------------------------------------------------


def test_train_digits(capsys, tmp_path):
    out, j = tmp_path / "bundle", tmp_path / "train.json"
    rc, stdout, err = run(capsys, "train", "--dataset", "digits", "--epochs", "1", "--out", out, "--json", j)
    assert rc == 0, err
    assert (out / "manifest.json").is_file() and (out / "model.pt").is_file()
    res = load(j)
    assert {"bundle", "sha256", "history"} <= set(res)
    assert res["epochs"] == 1 and len(res["history"]) == 1
    assert Path(res["bundle"]) == out
    assert res["sha256"] == hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    assert res["sha256"][:12] in stdout
    m = load(out / "manifest.json")
    assert m["arch"] == "smallcnn" and m["dataset"] == "digits" and m["input_shape"] == [1, 32, 32]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


@pytest.fixture(scope="module")
def synthetic_bundle(tmp_path_factory):
    """``train --dataset synthetic --data-option n=200`` through the CLI: (exit code, bundle, json)."""
    d = tmp_path_factory.mktemp("cli_synth")
    out, j = d / "bundle", d / "train.json"
    rc = main(["train", "--dataset", "synthetic", "--data-option", "n=200", "--arch", "smallcnn",
               "--epochs", "1", "--out", str(out), "--json", str(j)])
    return rc, out, j


def test_train_synthetic_with_data_options(synthetic_bundle):
    rc, out, j = synthetic_bundle
    assert rc == 0
    res = load(j)
    assert res["dataset"] == "synthetic" and res["arch"] == "smallcnn" and res["epochs"] == 1
    assert res["steps"] == -(-200 // 64)  # n=200 was parsed as an int and reached the dataset
    m = load(out / "manifest.json")
    assert m["input_shape"] == [3, 32, 32]
    train_stage = next(s for s in m["stages"] if s["stage"] == "train")
    assert train_stage["data"]["params"]["options"] == {"n": 200}


def test_train_refuses_to_overwrite_a_folder_that_is_not_a_bundle(capsys, tmp_path):
    keep = tmp_path / "keep"
    (keep / "sub").mkdir(parents=True)
    (keep / "notes.txt").write_text("precious\n")
    (keep / "sub" / "data.bin").write_bytes(b"\x00\x01\x02")
    before = snapshot(keep)
    rc, _, err = run(capsys, "train", "--epochs", "1", "--max-steps", "1", "--out", keep)
    msg = user_error(rc, err)
    assert "refusing to overwrite" in msg
    assert snapshot(keep) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]  # no temp folder left behind


# --- evaluate ------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["bundle", "onnx"])
def test_evaluate_and_min_accuracy(capsys, tmp_path, tiny_bundle, tiny_onnx, which):
    art = tiny_bundle if which == "bundle" else tiny_onnx
    j = tmp_path / "eval.json"
    rc, out, err = run(capsys, "evaluate", art, "--dataset", "digits", "--json", j)
    assert rc == 0, err
    res = load(j)
    assert res["n"] == 540 and res["dataset"] == "digits" and res["split"] == "test"
    assert res["accuracy"] >= 0.9
    assert res["correct"] == round(res["accuracy"] * 540)
    assert res["artifact"]["backend"] == ("torch" if which == "bundle" else "onnxruntime")
    assert f"{res['accuracy']:.4f}" in out
    acc = res["accuracy"]

    # the threshold is inclusive: exactly the measured accuracy passes, anything above fails with exit 1
    rc, _, err = run(capsys, "evaluate", art, "--min-accuracy", acc, "--json", j)
    assert rc == 0, err
    rc, _, err = run(capsys, "evaluate", art, "--min-accuracy", min(acc + 1e-3, 1.0) if acc < 1 else 1.01, "--json", j)
    assert rc == 1 and "Traceback" not in err
    res = load(j)  # the result is still written, with the negative verdict
    assert res["passed"] is False and res["accuracy"] == acc


def test_bundle_and_onnx_agree_on_accuracy(capsys, tmp_path, tiny_bundle, tiny_onnx):
    accs = []
    for art in (tiny_bundle, tiny_onnx):
        rc, _, err = run(capsys, "evaluate", art, "--json", tmp_path / "e.json")
        assert rc == 0, err
        accs.append(load(tmp_path / "e.json")["accuracy"])
    assert abs(accs[0] - accs[1]) <= 2 / 540


def test_evaluate_defaults_to_the_bundles_training_data(capsys, tmp_path, synthetic_bundle):
    _, bundle, _ = synthetic_bundle
    j = tmp_path / "e.json"
    rc, _, err = run(capsys, "evaluate", bundle, "--json", j)  # no --dataset
    assert rc == 0, err
    res = load(j)
    assert res["dataset"] == "synthetic" and res["n"] == 200  # the dataset and its n=200 came from the manifest
    # an explicit option overrides the remembered one
    rc, _, err = run(capsys, "evaluate", bundle, "--data-option", "n=30", "--json", j)
    assert rc == 0, err
    assert load(j)["n"] == 30


def test_evaluate_on_another_dataset_does_not_inherit_the_bundles_options(capsys, tmp_path):
    """A bundle trained on synthetic(n=..., channels=1) evaluated on --dataset digits: the synthetic
    options must not be passed to digits (they used to be: "unexpected keyword argument 'n'")."""
    b = tmp_path / "gray"
    rc, _, err = run(capsys, "train", "--dataset", "synthetic", "--data-option", "n=64", "--data-option", "channels=1",
                     "--epochs", "1", "--max-steps", "1", "--out", b)
    assert rc == 0, err
    rc, _, err = run(capsys, "evaluate", b, "--dataset", "digits", "--json", tmp_path / "e.json")
    assert rc == 0, err
    assert load(tmp_path / "e.json")["n"] == 540


def test_evaluate_wrong_input_shape(capsys, tiny_bundle, tiny_onnx):
    for art in (tiny_bundle, tiny_onnx):
        rc, _, err = run(capsys, "evaluate", art, "--dataset", "synthetic", "--data-option", "n=20")
        msg = user_error(rc, err)
        assert "(3, 32, 32)" in msg and "(1, 32, 32)" in msg


def test_evaluate_wrong_number_of_classes(capsys, tiny_bundle):
    rc, _, err = run(capsys, "evaluate", tiny_bundle, "--dataset", "synthetic", "--data-option", "n=20",
                     "--data-option", "channels=1", "--data-option", "num_classes=5")
    msg = user_error(rc, err)
    assert "5 classes" in msg and "10" in msg


# --- export / info / bench -----------------------------------------------------------------------


def test_export(capsys, tmp_path, tiny_bundle):
    out, j = tmp_path / "deep" / "m.onnx", tmp_path / "export.json"
    rc, stdout, err = run(capsys, "export", tiny_bundle, "--out", out, "--json", j)
    assert rc == 0, err
    res = load(j)
    assert out.is_file() and res["path"] == str(out)
    assert res["self_check_max_abs_diff"] is not None and res["self_check_max_abs_diff"] <= 1e-5
    assert res["self_check_top1_agreement"] == 1.0
    assert res["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() and res["bytes"] == out.stat().st_size
    assert res["source_sha256"] == hashlib.sha256((tiny_bundle / "manifest.json").read_bytes()).hexdigest()
    assert res["opset"] == 20


def test_export_needs_an_onnx_target_and_a_bundle(capsys, tmp_path, tiny_bundle, tiny_onnx):
    rc, _, err = run(capsys, "export", tiny_bundle, "--out", tmp_path / "m.pt")
    assert ".onnx" in user_error(rc, err)
    assert not (tmp_path / "m.pt").exists()
    rc, _, err = run(capsys, "export", tiny_onnx, "--out", tmp_path / "again.onnx")
    assert "bundle" in user_error(rc, err)
    assert not (tmp_path / "again.onnx").exists()


@pytest.mark.parametrize("which", ["bundle", "onnx"])
def test_info(capsys, tmp_path, tiny_bundle, tiny_onnx, which):
    art = tiny_bundle if which == "bundle" else tiny_onnx
    j = tmp_path / "info.json"
    rc, out, err = run(capsys, "info", art, "--json", j)
    assert rc == 0, err
    res = load(j)
    info = res["info"]
    assert info["backend"] == ("torch" if which == "bundle" else "onnxruntime")
    assert info["input_shape"] == [1, 32, 32]
    assert info["classes"] == [str(i) for i in range(10)]
    assert info["precision"] == "fp32" and info["defense"] == "none"
    assert info["sha256"] in out
    if which == "bundle":
        assert res["manifest"]["arch"] == "smallcnn" and "vault_entries" in res
    else:
        assert res["onnx"]["opset"] == {"ai.onnx": 20}
        assert res["onnx"]["bytes"] == tiny_onnx.stat().st_size
        assert "vault" not in json.dumps(res["onnx"]["metadata"])  # nothing of the owner's vault ships


def test_bench(capsys, tmp_path, tiny_bundle, tiny_onnx):
    j = tmp_path / "bench.json"
    rc, out, err = run(capsys, "bench", tiny_bundle, tiny_onnx, "--batch-sizes", "1,4", "--iterations", "3",
                       "--warmup", "1", "--json", j)
    assert rc == 0, err
    rows = load(j)["rows"]
    assert len(rows) == 4
    assert sorted((r["backend"], r["batch"]) for r in rows) == [("onnxruntime", 1), ("onnxruntime", 4), ("torch", 1), ("torch", 4)]
    first = [r for r in rows if r["artifact"] == str(tiny_bundle)]
    assert len(first) == 2 and all(r["ratio_p50"] == 1.0 for r in first)
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p90_ms"] and r["throughput"] > 0
    assert out.count("\n") >= 5  # the table: header, rule, 4 rows


def test_bench_refuses_artifacts_with_different_input_shapes(capsys, tiny_bundle, synthetic_bundle):
    rc, _, err = run(capsys, "bench", tiny_bundle, synthetic_bundle[1], "--iterations", "1", "--warmup", "0")
    assert "input shapes" in user_error(rc, err)


# --- pipeline ------------------------------------------------------------------------------------

TINY_PIPELINE = """\
name: tiny
seed: 0
data: {{name: digits}}
model: {{arch: smallcnn}}
train: {{epochs: 1{extra}}}
evaluate: {{min_accuracy: {min_accuracy}}}
bench: {{batch_sizes: [1], warmup: 1, iterations: 2}}
"""


def test_pipeline_passes(capsys, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_PIPELINE.format(min_accuracy=0.0, extra=""))
    out, j = tmp_path / "run", tmp_path / "result.json"
    rc, stdout, err = run(capsys, "pipeline", "--config", cfg, "--out", out, "--json", j)
    assert rc == 0, err
    assert (out / "report.md").is_file() and (out / "report.json").is_file()
    rep = load(out / "report.json")
    assert rep == load(j)
    assert rep["passed"] is True and rep["checks"] and all(c["passed"] for c in rep["checks"])
    assert {c["name"] for c in rep["checks"]} == {"accuracy bundle", "accuracy onnx", "parity bundle vs onnx"}
    parity = rep["results"]["evaluate"]["parity"]["onnx"]
    assert parity["max_abs_diff"] <= 1e-5 and parity["top1_agreement"] == 1.0 and parity["n"] == 540
    assert Path(rep["artifacts"]["bundle"]).is_dir() and Path(rep["artifacts"]["onnx"]).is_file()
    assert len(rep["results"]["bench"]["rows"]) == 2  # two artifacts x batch size 1
    assert rep["config"]["params"]["train"]["params"]["epochs"] == 1
    assert "PASS" in (out / "report.md").read_text() and "FAIL" not in stdout


def test_pipeline_failed_check_exits_1_and_still_reports(capsys, tmp_path):
    cfg = tmp_path / "strict.yaml"
    cfg.write_text(TINY_PIPELINE.format(min_accuracy=1.0, extra=", max_steps: 3"))
    out = tmp_path / "run"
    rc, stdout, err = run(capsys, "pipeline", "--config", cfg, "--out", out)
    assert rc == 1 and "Traceback" not in err
    assert (out / "report.md").is_file()
    rep = load(out / "report.json")
    assert rep["passed"] is False
    failed = {c["name"] for c in rep["checks"] if not c["passed"]}
    assert failed == {"accuracy bundle", "accuracy onnx"}  # parity still holds
    assert "FAIL accuracy bundle" in stdout


@pytest.mark.parametrize(
    "text, needle",
    [
        ("train: [epochs: 3\n", "not valid YAML"),
        ("train: {epoch: 3}\n", "'epoch'"),
        ("trian: {epochs: 3}\n", "'trian'"),
        ("train: {epochs: many}\n", "'epochs'"),
        ("train: {epochs: 0}\n", "epochs"),
        ("evaluate: {min_accuracy: 2}\n", "min_accuracy"),
        ("data: digits\n", "data"),  # a section written as a scalar (used to escape as an AttributeError)
        ("- 1\n- 2\n", "mapping"),
    ],
)
def test_pipeline_bad_config(capsys, tmp_path, text, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    rc, _, err = run(capsys, "pipeline", "--config", cfg, "--out", tmp_path / "run")
    assert needle in user_error(rc, err)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_pipeline_missing_config(capsys, tmp_path):
    rc, _, err = run(capsys, "pipeline", "--config", tmp_path / "nope.yaml", "--out", tmp_path / "run")
    assert "does not exist" in user_error(rc, err)


# --- bad inputs ----------------------------------------------------------------------------------


def test_missing_artifact(capsys, tmp_path):
    for cmd in ("evaluate", "info", "bench"):
        for name in ("nope", "nope.onnx", "nope.engine"):
            rc, _, err = run(capsys, cmd, tmp_path / name)
            assert "does not exist" in user_error(rc, err)


def test_folder_that_is_not_a_bundle(capsys, tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "model.pt").write_bytes(b"x")
    for args in (["evaluate"], ["info"], ["export", "--out", tmp_path / "m.onnx"]):
        rc, _, err = run(capsys, args[0], tmp_path / "stuff", *args[1:])
        assert "not an edgeguard bundle" in user_error(rc, err)


def test_corrupt_onnx(capsys, tmp_path, tiny_onnx):
    junk = tmp_path / "x.onnx"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    truncated = tmp_path / "t.onnx"
    data = tiny_onnx.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for f in (junk, truncated):
        for cmd in ("evaluate", "info", "bench"):
            rc, _, err = run(capsys, cmd, f)
            assert "not a valid ONNX model" in user_error(rc, err)


def test_unknown_arch_and_dataset_are_usage_errors(capsys, tmp_path):
    rc, _, err = run(capsys, "train", "--arch", "nope", "--out", tmp_path / "b")
    assert "--arch" in usage_error(rc, err)
    rc, _, err = run(capsys, "train", "--dataset", "nope", "--out", tmp_path / "b")
    assert "--dataset" in usage_error(rc, err)
    rc, _, err = run(capsys, "evaluate", tmp_path, "--dataset", "nope")
    assert "--dataset" in usage_error(rc, err)
    assert not (tmp_path / "b").exists()


def test_data_options(capsys, tmp_path, tiny_bundle):
    rc, _, err = run(capsys, "train", "--data-option", "foo", "--out", tmp_path / "b")
    assert "key=value" in usage_error(rc, err)
    rc, _, err = run(capsys, "train", "--data-option", "nope=1", "--epochs", "1", "--out", tmp_path / "b")
    assert "'nope'" in user_error(rc, err)
    rc, _, err = run(capsys, "evaluate", tiny_bundle, "--data-option", "nope=1")
    assert "'nope'" in user_error(rc, err)
    assert not (tmp_path / "b").exists()


def test_tampered_bundle(capsys, tmp_path, tiny_bundle):
    b = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, b)
    data = bytearray((b / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (b / "model.pt").write_bytes(bytes(data))
    for args in (["evaluate"], ["info"], ["export", "--out", tmp_path / "m.onnx"]):
        rc, _, err = run(capsys, args[0], b, *args[1:])
        msg = user_error(rc, err)
        assert "sha256" in msg and "modified" in msg
    assert not (tmp_path / "m.onnx").exists()


class _Touch:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


class _SubDict(collections.OrderedDict):
    pass


def _payloads(marker: Path) -> dict:
    return {
        "plain_dict": {"a": [1, 2, 3], "b": "x"},
        "list": [1, 2, 3],
        "path": {"w": pathlib.Path("/etc/passwd")},
        "ordereddict_subclass": _SubDict(w=torch.zeros(2)),
        "code_on_unpickle": {"w": _Touch(marker)},
    }


@pytest.mark.parametrize("kind", list(_payloads(Path("m"))))
def test_model_pt_that_is_not_a_state_dict_is_refused(capsys, tmp_path, tiny_bundle, kind):
    marker = tmp_path / "pwned"
    b = tmp_path / "evil"
    shutil.copytree(tiny_bundle, b)
    torch.save(_payloads(marker)[kind], b / "model.pt")
    rehash(b)  # the hashes match: only the state-dict check stands in the way
    for args in (["evaluate"], ["info"], ["export", "--out", tmp_path / "m.onnx"]):
        rc, _, err = run(capsys, args[0], b, *args[1:])
        msg = user_error(rc, err)
        assert "refusing to load" in msg and "state dict" in msg
    assert not marker.exists()
    assert not (tmp_path / "m.onnx").exists()


def test_state_dict_for_another_architecture_is_refused(capsys, tmp_path, tiny_bundle):
    b = tmp_path / "other"
    shutil.copytree(tiny_bundle, b)
    torch.save({"w": torch.zeros(3)}, b / "model.pt")
    rehash(b)
    rc, _, err = run(capsys, "evaluate", b)
    assert "does not fit architecture 'smallcnn'" in user_error(rc, err)


def test_engine_needs_tensorrt(capsys, tmp_path):
    eng = tmp_path / "x.engine"
    eng.write_bytes(b"not really an engine")
    for cmd in ("evaluate", "info", "bench"):
        rc, _, err = run(capsys, cmd, eng)
        assert "TensorRT" in user_error(rc, err, code=3)


def test_unsupported_suffix(capsys, tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("hello")
    for cmd in ("evaluate", "info", "bench"):
        rc, _, err = run(capsys, cmd, f)
        assert "expected a bundle folder" in user_error(rc, err)


# --- the real console entry ----------------------------------------------------------------------


def _sub(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGEGUARD_QUIET": "1"}
    return subprocess.run([sys.executable, "-m", "edgeguard", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_subprocess_success(tmp_path, tiny_onnx):
    p = _sub("evaluate", tiny_onnx, "--json", "e.json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert load(tmp_path / "e.json")["n"] == 540
    assert p.stdout.startswith("accuracy ")


def test_subprocess_errors_have_no_traceback(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"\x00garbage" * 64)
    (tmp_path / "x.engine").write_bytes(b"engine")
    for args, code in ((["info", "x.onnx"], 2), (["evaluate", "x.engine"], 3), (["train", "--arch", "nope", "--out", "b"], 2)):
        p = _sub(*args, cwd=tmp_path)
        assert p.returncode == code, p.stderr
        assert "Traceback" not in p.stderr and p.stdout == ""
        if code == 3 or args[0] == "info":
            user_error(p.returncode, p.stderr, code)
        else:
            usage_error(p.returncode, p.stderr)


def test_console_script(tmp_path):
    exe = Path(sys.executable).parent / "edgeguard"
    if not exe.is_file():
        pytest.skip("no edgeguard console script next to this interpreter")
    p = subprocess.run([str(exe), "info", "nope"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    user_error(p.returncode, p.stderr)
    p = subprocess.run([str(exe), "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "edgeguard" in p.stdout


def test_same_seed_same_bundle_weights(tmp_path):
    """Two `train` runs with the same --seed write identical weights (init, shuffling, augmentation)."""
    import torch

    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["train", "--dataset", "synthetic", "--data-option", "n=96", "--data-option", "size=16",
                     "--model-option", "width=8", "--epochs", "1", "--augment", "shift", "--seed", "5",
                     "--out", str(out)]) == 0
        outs.append(torch.load(out / "model.pt", weights_only=True))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


@pytest.mark.parametrize(
    "args, match",
    [
        (["evaluate", "{onnx}", "--dataset", "digits", "--data-option", "size=abc"], "size must be an integer"),
        (["evaluate", "{onnx}", "--dataset", "synthetic", "--data-option", "split=train"], "--split"),
        (["evaluate", "{bundle}", "--device", "gpu"], "unknown device"),
        (["evaluate", "{onnx}", "--device", "foo"], "unknown device"),
        (["train", "--dataset", "digits", "--model-option", "width=-1", "--out", "{tmp}/x"], "bad option"),
        (["info", "{onnx}", "--json", "/dev/null/x.json"], "cannot access"),
    ],
    ids=["data-option-type", "reserved-option", "device-bundle", "device-onnx", "model-option", "json-path"],
)
def test_more_bad_inputs_are_one_sentence(capsys, tiny_bundle, tiny_onnx, tmp_path, args, match):
    args = [a.format(onnx=tiny_onnx, bundle=tiny_bundle, tmp=tmp_path) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_pipeline_seed_is_set_once_and_out_is_protected(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {epochs: 1, seed: 7}\n")
    assert main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "remove train.seed" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("do not delete")
    cfg.write_text("train: {epochs: 1}\n")
    assert main(["pipeline", "--config", str(cfg), "--out", str(busy)]) == 2
    assert "not an edgeguard run" in capsys.readouterr().err
    assert (busy / "thesis.tex").read_text() == "do not delete"


def test_watermark_cli_round_trip(capsys, tiny_bundle, tiny_onnx, tmp_path):
    """protect watermark -> verify (0 present / 1 absent / 2 no vault) -> attack finetune."""
    marked = tmp_path / "marked"
    assert main(["protect", "watermark", str(tiny_bundle), "--out", str(marked), "--n-triggers", "30",
                 "--trigger-batch", "10", "--epochs", "12", "--key-seed", "3", "--json", str(tmp_path / "wm.json")]) == 0
    assert json.loads((tmp_path / "wm.json").read_text())["n"] == 30
    assert main(["verify", str(marked), "--dataset", "digits", "--json", str(tmp_path / "v.json")]) == 0
    out = json.loads((tmp_path / "v.json").read_text())
    assert out["watermark"]["verdict"] == "present" and out["clean"]["n"] == 540
    assert main(["verify", str(tiny_onnx), "--vault", str(marked / "vault")]) == 1  # unmarked model: absent
    capsys.readouterr()
    assert main(["verify", str(tiny_onnx)]) == 2
    assert "needs the owner's vault" in capsys.readouterr().err
    assert main(["attack", "finetune", str(marked), "--mode", "rtll", "--epochs", "1", "--data-fraction", "0.2",
                 "--out", str(tmp_path / "att")]) == 0
    rc = main(["verify", str(tmp_path / "att"), "--vault", str(marked / "vault"), "--json", str(tmp_path / "a.json")])
    verdict = json.loads((tmp_path / "a.json").read_text())["watermark"]["verdict"]
    assert rc == (0 if verdict == "present" else 1)  # the exit code is the verdict
    capsys.readouterr()
    assert main(["protect", "watermark", str(tiny_bundle), "--out", str(tmp_path / "y"),
                 "--trigger-dir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_quantize_cli_and_its_bad_inputs(capsys, tiny_bundle, tmp_path):
    q = tmp_path / "q"
    assert main(["quantize", str(tiny_bundle), "--target", "cpu", "--calib-samples", "64", "--out", str(q),
                 "--json", str(tmp_path / "q.json")]) == 0
    res = json.loads((tmp_path / "q.json").read_text())
    assert res["mode"] == "ptq" and res["target"] == "cpu" and res["qdq_nodes"] > 0
    assert main(["info", str(q), "--json", str(tmp_path / "i.json")]) == 0
    assert json.loads((tmp_path / "i.json").read_text())["info"]["precision"] == "int8"
    assert main(["verify", str(tiny_bundle), str(q), "--vault", str(tmp_path / "novault")]) == 2
    capsys.readouterr()
    for args, match in (
        (["quantize", str(q), "--out", str(tmp_path / "qq")], "already quantized"),
        (["quantize", str(tiny_bundle), "--target", "gpu", "--out", str(tmp_path / "g")], "gpu"),
        (["quantize", str(tiny_bundle), "--calib-dataset", "synthetic", "--out", str(tmp_path / "s")], "calibration images are"),
    ):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err
    assert not (tmp_path / "qq").exists() and not (tmp_path / "s").exists()


def test_pipeline_report_never_contains_the_key_seed(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {epochs: 1}\nwatermark: {enabled: true, n_triggers: 30, trigger_batch: 10, epochs: 3, "
                   "key_seed: 8675309}\nbench: {enabled: false}\nevaluate: {min_accuracy: 0.0}\n")
    main(["pipeline", "--config", str(cfg), "--out", str(tmp_path / "run")])
    for name in ("report.json", "report.md"):
        assert "8675309" not in (tmp_path / "run" / name).read_text()
    assert "8675309" not in (tmp_path / "run" / "watermarked" / "manifest.json").read_text()
    assert "8675309" in (tmp_path / "run" / "watermarked" / "vault" / "watermark.json").read_text()


def test_verify_several_artifacts_applies_bonferroni(tiny_bundle, tiny_onnx, tmp_path):
    marked = tmp_path / "m"
    assert main(["protect", "watermark", str(tiny_bundle), "--out", str(marked), "--n-triggers", "30",
                 "--trigger-batch", "10", "--epochs", "12", "--key-seed", "4"]) == 0
    main(["verify", str(marked), str(tiny_onnx), "--json", str(tmp_path / "v.json")])
    res = json.loads((tmp_path / "v.json").read_text())["results"]
    assert [r["watermark"]["alpha"] for r in res] == [pytest.approx(1e-3 / 2)] * 2


# --- output defenses (issue 5) -------------------------------------------------------------------------


def test_export_with_a_fused_defense_and_evaluate_measures_it(capsys, tmp_path, tiny_bundle):
    out, j = tmp_path / "d.onnx", tmp_path / "d.json"
    rc, stdout, err = run(capsys, "export", tiny_bundle, "--out", out, "--defense", "heuristic",
                          "--defense-param", "beta=0.6", "--json", j)
    assert rc == 0, err
    res = load(j)
    assert res["defense"] == "heuristic" and res["placement"] == "graph" and res["head_check_max_abs_diff"] <= 1e-4
    assert "Sigmoid" in res["head_ops"] and "fused in the graph" in stdout
    rc, stdout, err = run(capsys, "evaluate", out, "--dataset", "digits", "--no-latency", "--json", tmp_path / "e.json")
    assert rc == 0, err
    m = load(tmp_path / "e.json")["defense_measurements"]
    assert m["defense"] == "heuristic" and m["params"]["beta"] == 0.6
    assert m["test"]["agreement"] == 1.0 and m["test"]["accuracy"] == m["test"]["clean_accuracy"]
    assert m["ood"]["n"] == 500 and m["ood"]["l1_mean"] > 0
    assert "argmax agreement 1.0000" in stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--defense", "nope"], "unknown defense 'nope'"),
        (["--defense", "heuristic", "--defense-param", "beta=-1"], "beta must lie in [0, 10]"),
        (["--defense", "adaptive_misinformation", "--defense-param", "tau=1.5"], "tau must lie in [0, 1]"),
        (["--defense", "reverse_sigmoid", "--defense-param", "epsilon=1"], "unknown parameter 'epsilon'"),
        (["--defense", "heuristic", "--defense-param", "beta=lots"], "must be a float"),
        (["--defense", "none", "--defense-param", "beta=1"], "takes no parameters"),
        (["--defense", "topk", "--defense-param", "k=11"], "exceeds the model's 10 classes"),
    ],
)
def test_export_bad_defense_input_is_exit_2_and_writes_nothing(capsys, tmp_path, tiny_bundle, args, needle):
    out = tmp_path / "x.onnx"
    rc, _, err = run(capsys, "export", tiny_bundle, "--out", out, *args)
    assert needle in user_error(rc, err)
    assert not out.exists() and not list(tmp_path.glob("x.defense.*.pt"))


def test_pipeline_defense_table(capsys, tmp_path):
    cfg = tmp_path / "d.yaml"
    cfg.write_text(TINY_PIPELINE.format(min_accuracy=0.0, extra="")
                   + "export:\n  defense_latency_iterations: 2\n  defense: [heuristic, {name: topk, params: {k: 1}}]\n")
    out = tmp_path / "run"
    rc, stdout, err = run(capsys, "pipeline", "--config", cfg, "--out", out)
    assert rc == 0, err
    rep = load(out / "report.json")
    rows = rep["results"]["defenses"]["rows"]
    assert [r["defense"] for r in rows] == ["heuristic", "topk[k=1]"]
    assert all(r["agreement"] == 1.0 and r["fusable"] and r["latency_ratio_b1"] > 0 for r in rows)
    assert {"heuristic (fp32) keeps the top-1", "topk[k=1] (fp32) keeps the top-1"} <= {c["name"] for c in rep["checks"]}
    md = (out / "report.md").read_text()
    assert "## Output defenses against model extraction" in md and "| topk[k=1] | fp32 | graph |" in md


def test_pipeline_rejects_a_bad_defense_before_any_work(capsys, tmp_path):
    cfg = tmp_path / "d.yaml"
    cfg.write_text("export:\n  defense: [{name: heuristic, params: {beta: -2}}]\n")
    rc, _, err = run(capsys, "pipeline", "--config", cfg, "--out", tmp_path / "run")
    assert "beta" in user_error(rc, err)
    assert not (tmp_path / "run").exists()


def test_one_rule_merges_flags_over_a_config():
    """docs/cli.md: a given flag replaces, options merge key by key, naming another thing drops the base's options."""
    from edgeguard.cli.options import merge_flags
    from edgeguard.config import DataConfig, ModelConfig
    from edgeguard.training import TrainConfig

    base = DataConfig("synthetic", options={"n": 100, "size": 16})
    assert merge_flags(base, "data", options={"n": 50}).options == {"n": 50, "size": 16}
    assert merge_flags(base, "data", name="synthetic", options=None) == base
    assert merge_flags(base, "data", name="digits").options == {}  # another dataset: its own options only
    m = ModelConfig("resnet18", options={"width": 8})
    assert merge_flags(m, "model", arch="smallcnn").options == {}  # the same rule for models (it used to keep them)
    assert merge_flags(m, "model", options={"depth": 2}).options == {"width": 8, "depth": 2}
    t = merge_flags(TrainConfig(epochs=3), "train", lr="0.5", epochs=None)  # validated and coerced like YAML
    assert (t.epochs, t.lr) == (3, 0.5)
    from edgeguard.errors import BadInput

    with pytest.raises(BadInput, match="train"):
        merge_flags(TrainConfig, "train", optimizer="lbfgs")


def test_a_named_flag_and_a_param_for_the_same_key_is_refused(tiny_onnx, tmp_path, capsys):
    rc = main(["attack", "extract", str(tiny_onnx), "--method", "knockoff", "--budget", "10", "--epochs", "1",
               "--param", "epochs=2", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "repeats --epochs" in err[0] and not (tmp_path / "s").exists()
