"""Bundles: round trip, tamper refusal, atomic writes, the owner vault."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from edgeguard.bundle import MANIFEST, WEIGHTS, ModelSpec, Vault, load_bundle, save_bundle, stage_record
from edgeguard.errors import BadInput
from edgeguard.fileio import sha256_file
from edgeguard.models import create_model
from edgeguard.training import TrainConfig

SPEC = ModelSpec("smallcnn", 10, tuple("0123456789"), (1, 32, 32), (0.3,), (0.3,), {"width": 8, "hidden": 16})


def _model(seed=0):
    torch.manual_seed(seed)
    return SPEC.build().eval()


def test_round_trip_gives_identical_outputs(tmp_path):
    m = _model()
    b = save_bundle(tmp_path / "b", m, SPEC, stages=[stage_record("train", TrainConfig(epochs=1))], dataset="digits")
    x = torch.rand(4, 1, 32, 32)
    again = load_bundle(b.path).load_model()
    torch.testing.assert_close(again(x), m(x), rtol=0, atol=0)
    man = json.loads((b.path / MANIFEST).read_text())
    assert man["arch"] == "smallcnn" and man["model_options"] == {"width": 8, "hidden": 16}
    assert man["files"][WEIGHTS]["sha256"] == sha256_file(b.path / WEIGHTS)
    assert man["stages"][0]["stage"] == "train" and man["stages"][0]["config"]["type"] == "TrainConfig"
    assert man["normalization"] == {"mean": [0.3], "std": [0.3]}
    assert man["edgeguard_version"]


def test_tampered_weights_are_refused(tmp_path):
    b = save_bundle(tmp_path / "b", _model(), SPEC, stages=[])
    data = bytearray((b.path / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b.path / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(BadInput, match="does not match the sha256"):
        load_bundle(b.path)


def test_edited_manifest_is_refused(tmp_path):
    b = save_bundle(tmp_path / "b", _model(), SPEC, stages=[])
    (b.path / MANIFEST).write_text("{not json")
    with pytest.raises(BadInput, match="not valid JSON"):
        load_bundle(b.path)


def test_non_state_dict_pickle_is_refused_even_with_matching_hash(tmp_path):
    b = save_bundle(tmp_path / "b", _model(), SPEC, stages=[])
    torch.save({"weights": [1, 2, 3]}, b.path / WEIGHTS)
    man = json.loads((b.path / MANIFEST).read_text())
    man["files"][WEIGHTS]["sha256"] = sha256_file(b.path / WEIGHTS)
    (b.path / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(BadInput, match="not a state dict"):
        load_bundle(b.path).load_model()


def test_state_dict_of_another_architecture_is_refused(tmp_path):
    other = create_model("smallcnn", num_classes=10, in_channels=1)  # default width: shapes differ
    b = save_bundle(tmp_path / "b", other, SPEC, stages=[])
    with pytest.raises(BadInput, match="does not fit architecture 'smallcnn'"):
        b.load_model()


def test_failed_write_leaves_previous_bundle_intact(tmp_path, monkeypatch):
    """A crash inside the write (here: writing the manifest) keeps the earlier bundle and no temp folder."""
    import edgeguard.bundle as bundle_mod

    out = tmp_path / "b"
    before = save_bundle(out, _model(0), SPEC, stages=[]).sha256
    calls = []

    def boom(path, obj):
        calls.append(path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bundle_mod, "atomic_write_json", boom)
    with pytest.raises(OSError):
        save_bundle(out, _model(1), SPEC, stages=[])
    assert calls, "the failure must happen inside the atomic write"
    monkeypatch.undo()
    assert load_bundle(out).sha256 == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temp folders left behind


def test_interrupted_swap_restores_the_previous_bundle(tmp_path, monkeypatch):
    """Ctrl-C between 'move old aside' and 'move new in' puts the old bundle back."""
    import edgeguard.fileio as fileio

    out = tmp_path / "b"
    before = save_bundle(out, _model(0), SPEC, stages=[]).sha256
    real_replace = fileio.os.replace
    dir_moves = []

    def flaky(src, dst):
        if fileio.Path(src).is_dir():
            dir_moves.append((src, dst))
            if len(dir_moves) == 2:  # the second folder rename: new bundle into place
                raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", flaky)
    with pytest.raises(KeyboardInterrupt):
        save_bundle(out, _model(1), SPEC, stages=[])
    monkeypatch.undo()
    assert load_bundle(out).sha256 == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(classes=m["classes"][:3]), "classes must list 10 names"),
        (lambda m: m.update(num_classes="ten"), "num_classes"),
        (lambda m: m.update(input_shape=[1, 32]), "input_shape"),
        (lambda m: m.update(format_version="x"), "format_version"),
        (lambda m: m["files"].update({"../../etc/hostname": {"sha256": "0"}}), "outside the bundle"),
        (lambda m: m["stages"].append({"config": {}}), "stages"),
    ],
    ids=["classes", "num_classes", "input_shape", "format_version", "path", "stage"],
)
def test_manifest_edited_into_nonsense_is_refused(tmp_path, edit, match):
    b = save_bundle(tmp_path / "b", _model(), SPEC, stages=[stage_record("train")])
    man = json.loads((b.path / MANIFEST).read_text())
    edit(man)
    (b.path / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(BadInput, match=match):
        load_bundle(b.path)


def test_manifest_normalization_must_match_the_weights(tmp_path):
    b = save_bundle(tmp_path / "b", _model(), SPEC, stages=[])
    man = json.loads((b.path / MANIFEST).read_text())
    man["normalization"]["mean"] = [0.9]
    (b.path / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(BadInput, match="normalization disagrees"):
        load_bundle(b.path).load_model()


def test_refuses_to_overwrite_a_folder_that_is_not_a_bundle(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(BadInput, match="not an edgeguard bundle"):
        save_bundle(out, _model(), SPEC, stages=[])
    assert (out / "notes.txt").read_text() == "keep me"


def test_vault_round_trip_tamper_and_inheritance(tmp_path):
    parent = save_bundle(tmp_path / "p", _model(), SPEC, stages=[])
    v = parent.vault
    v.put_json("watermark", {"n": 3, "labels": [1, 2, 3]})
    v.put_tensors("triggers", {"x": torch.arange(6.0).view(2, 3)})
    assert v.names() == ["triggers", "watermark"]
    assert v.get_json("watermark")["labels"] == [1, 2, 3]
    torch.testing.assert_close(v.get_tensors("triggers")["x"], torch.arange(6.0).view(2, 3))

    child = save_bundle(tmp_path / "c", _model(1), SPEC, stages=[], parent=parent)
    assert child.vault.names() == ["triggers", "watermark"]
    assert child.manifest["parent_sha256"] == parent.sha256
    assert "vault" not in child.manifest["files"]  # secrets are not part of the shipped files

    (parent.path / "vault" / "watermark.json").write_text('{"n": 3, "labels": [9, 9, 9]}')
    with pytest.raises(BadInput, match="was modified"):
        v.get_json("watermark")
    with pytest.raises(BadInput, match="no json entry"):
        Vault(tmp_path / "empty").get_json("nothing")


def test_missing_and_foreign_paths(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "folder").mkdir()
    with pytest.raises(BadInput, match="not an edgeguard bundle"):
        load_bundle(tmp_path / "folder")
    b = save_bundle(tmp_path / "b", _model(), SPEC, stages=[])
    shutil.copytree(b.path, tmp_path / "copy")
    (tmp_path / "copy" / WEIGHTS).unlink()
    with pytest.raises(BadInput, match="missing model.pt"):
        load_bundle(tmp_path / "copy")


def test_target_is_checked_before_long_work(tmp_path, monkeypatch):
    from edgeguard.bundle import check_target
    from edgeguard.config import DataConfig, ModelConfig
    from edgeguard.verbs import make as api

    empty = tmp_path / "empty"
    empty.mkdir()
    check_target(empty)  # an empty folder is a fine target
    save_bundle(empty, _model(), SPEC, stages=[])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "data.csv").write_text("1,2")

    def no_training(*a, **k):
        raise AssertionError("training started although the output folder cannot be written")

    monkeypatch.setattr(api, "fit", no_training)
    with pytest.raises(BadInput, match="refusing to overwrite"):
        api.train_bundle(DataConfig("digits"), ModelConfig("smallcnn"), TrainConfig(epochs=1), busy)
