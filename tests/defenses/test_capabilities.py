"""One fact in one place: what a defense can do is declared on its class.  A toy defense written in a temporary
module (its file and its registration, nothing else) is picked up by the pipeline's defenses stage (its top-1
promise checked), the grid's config and the adaptive attacks; and no list of defense names exists outside the
registry."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeguard.defenses import DEFENSES, capabilities, defense_class, defense_names

TOY = '''
import torch
from edgeguard.defenses.base import DEFENSES, Defense, DefenseContext


class Tempered(Defense):
    """softmax(logits / 2): flatter vectors, the same argmax."""

    name = "toy_tempered"
    context_free = True

    @classmethod
    def preserves_top1(cls, cfg):
        return True

    def forward(self, logits, x=None):
        return torch.softmax(logits / 2.0, dim=-1)


@DEFENSES.register("toy_tempered")
def build_toy(cfg: None, ctx: DefenseContext) -> Tempered:
    return Tempered(cfg, ctx.num_classes)
'''


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "toy_defense.py"
    path.write_text(TOY)
    spec = importlib.util.spec_from_file_location("toy_defense", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        yield "toy_tempered"
    finally:
        DEFENSES._entries.pop("toy_tempered", None)
        sys.modules.pop("toy_defense", None)


def test_capabilities_come_from_the_class():
    assert capabilities("heuristic").preserves_top1 and not capabilities("heuristic", {"top1_guard": False}).preserves_top1
    assert capabilities("mad").placement == "host" and capabilities("mad").preserves_top1  # the argmax oracle
    assert not capabilities("mad", {"oracle": "extreme"}).preserves_top1
    assert capabilities("modelguard_w", {"solver": "lp"}).placement == "host"
    assert capabilities("modelguard_s", {"online": True}).placement == "host"
    assert set(defense_names(context_free=True)) == {"none", "heuristic", "reverse_sigmoid", "rounding", "topk",
                                                      "gaussian", "modelguard_w"}
    assert defense_class("topk").preserves_top1(None)


@pytest.mark.slow
def test_a_toy_defense_is_picked_up_everywhere(toy, tiny_bundle, tmp_path):
    from edgeguard.attacks.extraction.adaptive import defense_mapping
    from edgeguard.grid.config import GridConfig
    from edgeguard.pipeline.config import PipelineConfig
    from edgeguard.pipeline.stages import Context, stage_defenses
    from edgeguard.runtime import open_runner

    caps = capabilities(toy)
    assert (caps.placement, caps.preserves_top1, caps.context_free) == ("graph", True, True)
    assert toy in defense_names(context_free=True) and toy in defense_names(placement="graph")
    # the pipeline: exported, measured, and its top-1 promise checked
    cfg = PipelineConfig.from_mapping({"export": {"defense": [toy], "defense_latency_iterations": 1}})
    ctx = Context(cfg=cfg, out=tmp_path / "run", bundle=str(tiny_bundle))
    (tmp_path / "run").mkdir()
    stage_defenses(ctx)
    check = next(c for c in ctx.checks if c["name"].startswith(toy))
    assert check["passed"] and "keeps the top-1" in check["name"], check
    # the grid: a defense point of its own
    grid = GridConfig.from_mapping({"defenses": [toy], "attacks": ["knockoff"]})
    assert toy in {p.name for p in grid.defense_points()}
    # the adaptive attacks: the mapping is rebuilt from the artifact's metadata alone

    import torch

    from edgeguard.attacks.extraction.base import QueryOracle

    with open_runner(ctx.results["defenses"]["rows"][0]["artifact"]) as victim:
        fn, _ = defense_mapping(QueryOracle(victim, 10), 10)
        p = np.full((1, 10), 0.02, np.float32)
        p[0, 3] = 0.82
        q = fn(torch.from_numpy(p)).numpy()
    assert q.argmax() == 3 and q.max() < p.max()  # tempered, same argmax


def test_no_list_of_defense_names_outside_the_registry():
    names = set(DEFENSES.names())
    root = Path(__file__).resolve().parents[2] / "edgeguard"
    offenders = []
    for f in root.rglob("*.py"):
        for lineno, line in enumerate(f.read_text().splitlines(), 1):
            quoted = set(re.findall(r'"([a-z_]+)"', line))
            if len(quoted & names - {"none"}) >= 3:  # three defense names on one line: a hand-kept list
                offenders.append(f"{f.relative_to(root)}:{lineno}")
    assert not offenders, offenders
