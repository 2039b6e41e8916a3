"""The demo pipeline exactly as README's `make demo` runs it (slow: about 4-5 minutes on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeguard.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_pipeline_meets_the_acceptance_bar(tmp_path):
    out = tmp_path / "demo"
    assert main(["pipeline", "--config", str(ROOT / "configs" / "demo.yaml"), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    acc = report["results"]["evaluate"]["accuracy"]
    assert acc["bundle"]["accuracy"] >= 0.95 and acc["bundle"]["n"] == 540
    assert acc["onnx"]["accuracy"] == acc["bundle"]["accuracy"]
    parity = report["results"]["evaluate"]["parity"]["onnx"]
    # the shipped model is MagicGuard-ed: runtimes compute sin(1e4 * logit) differently, bounded by the guard's 2a
    assert parity["max_abs_diff"] <= 1e-3 and parity["top1_agreement"] == 1.0 and parity["atol"] == pytest.approx(0.02001)
    mg = report["results"]["magicguard"]
    assert mg["protect"]["accuracy_after"] == mg["protect"]["accuracy_before"] == pytest.approx(acc["bundle"]["accuracy"], abs=1e-6)
    assert mg["protect"]["trigger_accuracy_after"] == 1.0
    assert [r["form"] for r in mg["fidelity"]] == ["FP32 ONNX", "INT8 ONNX"]
    assert all(abs(r["guarded"] - r["unguarded"]) <= 0.001 and len(r["fp32_nodes"]) == 4 for r in mg["fidelity"])
    summary = {(r["recipe"], r["model"]): r for r in mg["destruction"]["summary"]}
    assert summary[("SGD lr 0.001", "guarded")]["final_max"] <= 0.2
    assert summary[("SGD lr 0.001", "unguarded")]["final_min"] >= 0.9
    assert ("Adam lr 0.0001", "guarded") in summary  # reported as measured, destroyed or not
    assert (out / mg["plot"]).is_file() and "## MagicGuard (self-destruction under fine-tuning)" in (out / "report.md").read_text()
    assert {r["batch"] for r in report["results"]["bench"]["rows"]} == {1, 64}
    md = (out / "report.md").read_text()
    assert "## Accuracy (digits test split, n=540)" in md and "FAIL" not in md
    rows = {r["model"]: r for r in report["results"]["watermark"]["rows"]}
    assert set(rows) == {"no watermark", "watermarked", "watermarked, INT8 (ptq, cpu)", "after FTLL", "after FTAL",
                         "after RTLL", "after RTAL"}
    assert rows["watermarked, INT8 (ptq, cpu)"]["verdict"] == "present"
    assert acc["onnx_int8"]["artifact"]["precision"] == "int8"
    assert acc["onnx_int8"]["accuracy"] >= acc["bundle"]["accuracy"] - 0.01
    assert acc["onnx_int8"]["bytes"] < acc["onnx"]["bytes"] / 2
    assert rows["watermarked"]["trigger_accuracy"] == 1.0 and rows["watermarked"]["verdict"] == "present"
    assert rows["no watermark"]["verdict"] == "absent"
    assert rows["watermarked"]["clean_accuracy"] >= rows["no watermark"]["clean_accuracy"] - 0.01
    assert "## Watermark (Adi et al. backdoor) on the ONNX artifacts" in md
    defenses = {(r["defense"], r["precision"]): r for r in report["results"]["defenses"]["rows"]}
    assert len(defenses) == 19  # 9 fusable defenses on FP32 and INT8, MAD once (host-side)
    assert ("mad[jacobian=closed_form]", "int8") not in defenses and not defenses[("mad[jacobian=closed_form]", "fp32")]["fusable"]
    for key in [("heuristic", "fp32"), ("heuristic", "int8"), ("modelguard_w", "int8"), ("modelguard_s", "fp32")]:
        assert defenses[key]["agreement"] == 1.0 and defenses[key]["accuracy"] == acc["bundle"]["accuracy"]
    assert defenses[("heuristic", "fp32")]["ood_l1_mean"] > 10 * defenses[("heuristic", "fp32")]["l1_mean"]
    assert abs(defenses[("modelguard_w", "fp32")]["l1_mean"] - 1.0) < 1e-3  # spends its whole budget
    assert "## Output defenses against model extraction" in md
    x = {r["defense"]: r for r in report["results"]["extraction"]["rows"]}
    assert set(x) == {"none", "heuristic"} and all(r["queries_used"] == 1000 for r in x.values())
    assert x["none"]["fidelity"] > 0.3  # chance is 0.1
    assert x["heuristic"]["defense_l1_mean"] > 0 and x["none"]["defense_l1_mean"] == 0
    assert "## Model extraction (knockoff)" in md
    fr = report["results"]["fragile"]
    rows = {r["artifact"]: r for r in fr["rows"]}
    assert fr["enrol"]["kept"] >= 45 and fr["enrol"]["check"]["verdict"] == "intact"
    assert rows["shipped FP32 ONNX (enrolled)"]["verdict"] == "intact" and rows["shipped FP32 ONNX (enrolled)"]["acc_tri"] == 1.0
    assert rows["INT8 ONNX, FP32 enrolment"]["verdict"] == "drift"
    assert rows["INT8 ONNX (enrolled)"]["verdict"] == "intact"
    tampered = [r for r in fr["rows"] if r["artifact"].startswith(("FTLL", "weight noise"))]
    assert len(tampered) == 2 and all(r["verdict"] == "modified" and not r["hash_matches"] for r in tampered)
    assert "## Fragile triggers" in md
    sv = report["results"]["serve"]
    assert sv["watermark_server"] == sv["watermark_file"] and sv["watermark_server"]["verdict"] == "present"
    ks = sv["knockoff_server"]
    assert ks["queries_used"] == ks["server"]["inference_rows"] == 500
    assert abs(ks["fidelity"] - sv["knockoff_file"]["fidelity"]) <= 0.02 and sv["stop_seconds"] < 10
    assert "## Served by Triton Inference Server" in md
    assert report["seconds"]["total"] < 540
