"""Backdoor watermark: embedding, verification on bundle and ONNX, false positives, removal attacks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeguard.api import evaluate_artifact, export_bundle, train_bundle
from edgeguard.attacks import FinetuneConfig, finetune_attack
from edgeguard.bundle import MANIFEST, load_bundle
from edgeguard.config import DataConfig, ModelConfig
from edgeguard.errors import BadInput
from edgeguard.protect import WatermarkConfig, embed_watermark, generate_triggers, read_key, verify_watermark
from edgeguard.runtime import open_runner
from edgeguard.training import TrainConfig

KEY_SEED = 99


@pytest.fixture(scope="module")
def marked(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("wm") / "marked"
    res = embed_watermark(tiny_bundle, out, WatermarkConfig(epochs=20), key_seed=KEY_SEED)
    onnx_path = out.parent / "marked.onnx"
    export_bundle(out, onnx_path)
    return res, out, onnx_path


def test_generated_key_is_seeded_uniform_and_committed():
    a = generate_triggers(100, (3, 32, 32), 10, seed=1)
    b = generate_triggers(100, (3, 32, 32), 10, seed=1)
    c = generate_triggers(100, (3, 32, 32), 10, seed=2)
    assert a.sha256 == b.sha256 != c.sha256
    assert a.images.dtype == torch.uint8 and a.images.shape == (100, 3, 32, 32)
    counts = torch.bincount(a.labels, minlength=10)
    assert counts.min() >= 2 and counts.max() <= 25  # uniform draws, not one class
    assert float(a.images.float().std()) > 30  # real structure, not a flat image


def test_embedding_meets_the_acceptance_bar(marked, tiny_bundle, digits_test):
    """Issue #3: trigger accuracy 100% on bundle and ONNX, verdict present, clean accuracy within 1 point."""
    res, bundle, onnx_path = marked
    vault = load_bundle(bundle).vault
    for artifact in (bundle, onnx_path):
        with open_runner(artifact) as r:
            v = verify_watermark(r, vault)
        assert (v.matches, v.n, v.verdict) == (100, 100, "present")
        assert v.p_value < 1e-90 and v.m_star == 21 and v.passed
    before = evaluate_artifact(tiny_bundle, DataConfig("digits")).accuracy
    after = evaluate_artifact(onnx_path, DataConfig("digits")).accuracy
    assert after >= before - 0.01


def test_key_lives_in_the_vault_only(marked):
    res, bundle, onnx_path = marked
    b = load_bundle(bundle)
    key, record = read_key(b.vault)
    assert record["key_seed"] == KEY_SEED and record["key_sha256"] == key.sha256 == res.key_sha256
    manifest_text = (bundle / MANIFEST).read_text()
    assert str(KEY_SEED) not in json.dumps([s.get("config") for s in b.stages])  # no key seed in the manifest
    assert key.sha256 in manifest_text  # only the commitment
    blob = onnx_path.read_bytes()
    assert key.images[0].numpy().tobytes()[:256] not in blob  # no trigger pixels in what ships


def test_no_false_positives_on_ten_unmarked_models(tmp_path):
    """Issue #3: 10 independently seeded models without the watermark -> verdict absent every time."""
    key_vault = tmp_path / "keys"
    for seed in range(10):
        out = tmp_path / f"m{seed}"
        train_bundle(DataConfig("digits"), ModelConfig("smallcnn", options={"width": 8, "hidden": 32}),
                     TrainConfig(epochs=2, seed=seed), out)
        b = load_bundle(out)
        key = generate_triggers(100, (1, 32, 32), 10, seed=1000 + seed)
        from edgeguard.bundle import Vault

        v = Vault(key_vault / str(seed))
        v.put_tensors("watermark_triggers", {"images": key.images, "labels": key.labels})
        v.put_json("watermark", {"key_sha256": key.sha256, "n": 100, "num_classes": 10, "input_shape": [1, 32, 32], "alpha": 1e-3})
        with open_runner(b.path) as r:
            res = verify_watermark(r, v)
        assert res.verdict == "absent", (seed, res.matches)
        assert res.matches < 21


def test_vault_for_another_model_is_refused(marked, tmp_path):
    res, bundle, _ = marked
    other = tmp_path / "other"
    train_bundle(DataConfig("synthetic", options={"n": 64, "num_classes": 4, "channels": 1}),
                 ModelConfig("smallcnn", options={"width": 8}), TrainConfig(epochs=1), other)
    with open_runner(other) as r, pytest.raises(BadInput, match="is for a 10-class 1x32x32 model"):
        verify_watermark(r, load_bundle(bundle).vault)
    rgb = tmp_path / "rgb"
    train_bundle(DataConfig("synthetic", options={"n": 64}), ModelConfig("smallcnn", options={"width": 8}), TrainConfig(epochs=1), rgb)
    with open_runner(rgb) as r, pytest.raises(BadInput, match="takes 3x32x32"):
        verify_watermark(r, load_bundle(bundle).vault)


def test_tampered_key_is_refused(marked, tmp_path):
    import shutil

    _, bundle, _ = marked
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    rec = json.loads((copy / "vault" / "watermark.json").read_text())
    rec["num_classes"] = 100
    (copy / "vault" / "watermark.json").write_text(json.dumps(rec))
    with pytest.raises(BadInput, match="was modified"):
        read_key(load_bundle(copy).vault)


@pytest.mark.parametrize("mode", ["ftll", "ftal", "rtll", "rtal"])
def test_removal_attacks_change_what_they_should(marked, tmp_path, mode):
    _, bundle, _ = marked
    before = load_bundle(bundle).load_model().state_dict()
    res = finetune_attack(bundle, tmp_path / mode, FinetuneConfig(mode=mode, epochs=1, data_fraction=0.25, lr=0.01))
    attacked = load_bundle(res.bundle)
    after = attacked.load_model().state_dict()
    assert res.samples == round(1257 * 0.25)
    assert attacked.stages[-1]["stage"] == "attack_finetune" and attacked.stages[-1]["config"]["params"]["mode"] == mode
    assert not (attacked.path / "vault").exists()  # the attacker has no owner secrets
    head_changed = not torch.equal(before["net.classifier.weight"], after["net.classifier.weight"])
    body_changed = not torch.equal(before["net.features.0.0.weight"], after["net.features.0.0.weight"])
    assert head_changed
    assert body_changed == mode.endswith("al")
    with open_runner(res.bundle) as r:
        v = verify_watermark(r, load_bundle(bundle).vault)  # verified as an outsider: no head restored
    if mode.startswith("ft"):  # one short epoch of fine-tuning does not remove the watermark
        assert v.verdict == "present", (mode, v.matches)
    acc = evaluate_artifact(res.bundle, DataConfig("digits")).accuracy
    # FT keeps a usable model; RT re-initialised the head (chance: 0.1) and 5 steps retrained it far above chance
    assert acc >= (0.9 if mode.startswith("ft") else 0.5), (mode, acc)


def test_freeze_bn_keeps_running_statistics(marked, tmp_path):
    _, bundle, _ = marked
    before = load_bundle(bundle).load_model().state_dict()
    res = finetune_attack(bundle, tmp_path / "strict", FinetuneConfig(mode="ftll", epochs=1, data_fraction=0.25, freeze_bn=True))
    after = load_bundle(res.bundle).load_model().state_dict()
    stats = [k for k in before if k.endswith("running_mean")]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)


def test_bad_watermark_inputs(tiny_bundle, tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        embed_watermark(tiny_bundle, tmp_path / "x", WatermarkConfig(trigger_dir=str(tmp_path / "none")))
    pics = tmp_path / "pics"
    pics.mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(pics / f"{i}.png")
    with pytest.raises(BadInput, match="labels"):  # no labels file given and none to be found
        embed_watermark(tiny_bundle, tmp_path / "x", WatermarkConfig(trigger_dir=str(pics), labels=str(tmp_path / "nope.txt")))
    (tmp_path / "labels.txt").write_text("1\n2\n")
    with pytest.raises(BadInput, match="has 2 labels but"):
        embed_watermark(tiny_bundle, tmp_path / "x", WatermarkConfig(trigger_dir=str(pics), labels=str(tmp_path / "labels.txt")))
    assert not (tmp_path / "x").exists()


WATERMARKNN = __import__("pathlib").Path(__file__).resolve().parents[3] / "shared" / "data" / "watermarknn-trigger-set"


@pytest.mark.slow
@pytest.mark.skipif(not (WATERMARKNN / "pics").is_dir(), reason="WatermarkNN trigger set not present")
def test_real_watermarknn_trigger_set_embeds_and_verifies_on_onnx(tiny_bundle, tmp_path):
    """The published set (100 images, labels-cifar.txt), rendered to the digits model's 1x32x32."""
    cfg = WatermarkConfig(trigger_dir=str(WATERMARKNN / "pics"), labels=str(WATERMARKNN / "labels-cifar.txt"), epochs=25)
    res = embed_watermark(tiny_bundle, tmp_path / "marked", cfg)
    key, record = read_key(load_bundle(res.bundle).vault)
    assert record["files"][:3] == ["1.jpg", "10.jpg", "100.jpg"] and key.labels[:3].tolist() == [6, 2, 8]
    export_bundle(res.bundle, tmp_path / "m.onnx")
    with open_runner(tmp_path / "m.onnx") as r:
        v = verify_watermark(r, load_bundle(res.bundle).vault)
    # Measured: 91/100 after 25 epochs.  Grayscale 32x32 centre crops of large photos are less distinct
    # than generated keys (the 100% bar is for those); the verdict must still be present.
    assert v.verdict == "present" and v.matches >= 80 and v.p_value < 1e-40


def test_fromscratch_mode_trains_anew_with_the_bundles_recipe(tiny_bundle, tmp_path):
    res = embed_watermark(tiny_bundle, tmp_path / "fs", WatermarkConfig(mode="fromscratch", n_triggers=30, trigger_batch=10), key_seed=5)
    b = load_bundle(res.bundle)
    assert b.stages[-1]["train"]["params"]["epochs"] == load_bundle(tiny_bundle).stages[0]["config"]["params"]["epochs"]
    with open_runner(res.bundle) as r:
        v = verify_watermark(r, b.vault)
    assert v.verdict == "present" and v.n == 30
    assert evaluate_artifact(res.bundle, DataConfig("digits")).accuracy >= 0.9


def test_keys_that_can_never_verify_or_bad_seeds_are_refused(tiny_bundle, tmp_path):
    with pytest.raises(BadInput, match="can never give a significant verdict"):
        embed_watermark(tiny_bundle, tmp_path / "a", WatermarkConfig(n_triggers=2), key_seed=1)
    with pytest.raises(BadInput, match="key seed"):
        embed_watermark(tiny_bundle, tmp_path / "b", WatermarkConfig(n_triggers=30), key_seed=2**70)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_triggers_are_not_augmented_with_the_clean_data():
    """fit augments the clean batch only; extra (trigger) batches reach the model exactly as stored."""
    from edgeguard.training import Mix, TensorData, TrainConfig, fit

    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            seen.append(x.detach().clone())
            return torch.zeros(len(x), 3) + self.w

    keys = torch.rand(4, 1, 8, 8)
    clean = TensorData(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))
    fit(Spy(), clean, TrainConfig(epochs=1, batch_size=8, augment="crop_flip"),
        extra=Mix(TensorData(keys, torch.ones(4, dtype=torch.long)), 4))
    batch = seen[0]
    assert batch.shape[0] == 12
    assert any(torch.equal(batch[8:][i], keys[j]) for i in range(4) for j in range(4))
    assert {tuple(map(float, b.flatten()[:3])) for b in batch[8:]} == {tuple(map(float, k.flatten()[:3])) for k in keys}
