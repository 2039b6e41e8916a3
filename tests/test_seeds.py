"""``--seed`` means something everywhere or is gone: a walk over every click command finds each one that takes
``--seed``, and each must be proven here to change what it computes (weights, a graph, triggers, inputs) with the
seed -- never only the seed echoed in a record.  A command with randomness-free work has no ``--seed`` at all."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click
import pytest

from edgeguard.cli import cli, main


def _commands(group: click.Group = cli, prefix: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield " ".join((*prefix, name)), cmd


def _weights(bundle: Path) -> str:
    """The hash of a bundle's weights file (its manifest also records the seed: that must not count)."""
    return json.loads((bundle / "manifest.json").read_text())["files"]["model.pt"]


def _graph(onnx_path: Path) -> bytes:
    import onnx

    return onnx.load(str(onnx_path)).graph.SerializeToString()  # nodes and weights, not the metadata


def _json(p: Path) -> dict:
    return json.loads(p.read_text())


# command -> (argv for one seed, what it computed); {b}: the tiny bundle, {o}: its ONNX, {t}: the run's folder
Proof = tuple[list[str], Callable[[Path], object]]
PROOFS: dict[str, Proof] = {
    "train": (["train", "--dataset", "digits", "--epochs", "1", "--max-steps", "3", "--out", "{t}/out"],
              lambda t: _weights(t / "out")),
    "export": (["export", "{b}", "--defense", "gaussian", "--out", "{t}/d.onnx"], lambda t: _graph(t / "d.onnx")),
    "protect watermark": (["protect", "watermark", "{b}", "--n-triggers", "10", "--epochs", "1", "--key-seed", "3",
                           "--out", "{t}/out"], lambda t: _weights(t / "out")),
    "protect magicguard": (["protect", "magicguard", "{b}", "--ratio", "0.5", "--out", "{t}/out"],
                           lambda t: _weights(t / "out")),
    "protect fragile": (["protect", "fragile", "{o}", "--n", "4", "--steps", "5", "--repeats", "1", "--out",
                         "{t}/vault", "--json", "{t}/r.json"], lambda t: _json(t / "r.json")["trigger_sha256"]),
    "quantize": (["quantize", "{b}", "--mode", "ptq", "--calib-samples", "16", "--calibration", "minmax", "--out",
                  "{t}/out"], lambda t: (_weights(t / "out"), _graph(t / "out" / "model.onnx"))),
    "attack finetune": (["attack", "finetune", "{b}", "--mode", "rtll", "--epochs", "1", "--data-fraction", "0.2",
                         "--out", "{t}/out"], lambda t: _weights(t / "out")),
    "attack extract": (["attack", "extract", "{o}", "--method", "knockoff", "--budget", "64", "--epochs", "1",
                        "--out", "{t}/out"], lambda t: _weights(t / "out")),
    "bench": (["bench", "{o}", "--batch-sizes", "2", "--warmup", "0", "--iterations", "1", "--json", "{t}/r.json"],
              lambda t: _json(t / "r.json")["config"]["inputs_sha256"]),
    "pipeline": (["pipeline", "--config", "{t}/c.yaml", "--out", "{t}/run"], lambda t: _weights(t / "run" / "bundle")),
}
PIPELINE_YAML = """name: seeds
train: {epochs: 1, max_steps: 3}
bench: {enabled: false}
"""


def test_every_seed_option_reaches_code():
    seeded = {name for name, cmd in _commands() if any(p.name == "seed" for p in cmd.params)}
    assert seeded == set(PROOFS), (f"--seed without a proof that it changes an output: {sorted(seeded - set(PROOFS))}; "
                                   f"proofs for commands without --seed: {sorted(set(PROOFS) - seeded)}")


@pytest.mark.parametrize("name", sorted(PROOFS))
def test_the_seed_changes_what_the_command_computes(name, tiny_bundle, tiny_onnx, tmp_path):
    argv, read = PROOFS[name]
    got = {}
    for seed in (1, 2):
        t = tmp_path / f"s{seed}"
        t.mkdir()
        (t / "c.yaml").write_text(PIPELINE_YAML)
        args = [a.format(b=tiny_bundle, o=tiny_onnx, t=t) for a in argv]
        assert main(["-q", *args, "--seed", str(seed)]) == 0, args
        got[seed] = read(t)
    assert got[1] != got[2], f"{name}: --seed 1 and --seed 2 computed the same output"
