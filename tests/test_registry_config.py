"""The generic registry and the config objects: lookup, errors, coercion, JSON round-trip."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import pytest

from edgeguard.config import Config, DataConfig, ModelConfig, config_from_dict
from edgeguard.data import DATASETS
from edgeguard.errors import BadInput
from edgeguard.evaluate import BenchConfig
from edgeguard.export import ExportConfig
from edgeguard.models import MODELS
from edgeguard.pipeline import PipelineConfig
from edgeguard.registry import Registry
from edgeguard.training import TrainConfig


@dataclass(frozen=True)
class _ToyConfig(Config):
    beta: float = 0.5
    k: int = 3
    mode: Literal["a", "b"] = "a"
    on: bool = True
    sizes: tuple[int, ...] = (1, 2)


def test_registry_lookup_and_errors():
    reg = Registry("widget")

    @reg.register("alpha", config=_ToyConfig, family="x")
    def alpha(cfg):
        return cfg

    @reg.register("beta_2", family="y")
    def beta(cfg=None):
        return cfg

    assert reg.get("alpha") is alpha
    assert reg.names() == ["alpha", "beta_2"]
    assert reg.names(family="y") == ["beta_2"]
    with pytest.raises(BadInput, match=r"unknown widget 'gamma'; known: alpha, beta_2"):
        reg.get("gamma")
    with pytest.raises(ValueError, match="duplicate"):
        reg.register("alpha")(lambda: None)
    with pytest.raises(ValueError, match=r"\[a-z0-9_\]"):
        reg.register("Bad-Name")


def test_config_from_strings_coerces_and_validates():
    reg = Registry("widget")
    reg.register("alpha", config=_ToyConfig)(lambda c: c)
    cfg = reg.config_from("alpha", {"beta": "0.25", "k": "7", "mode": "b", "on": "false", "sizes": "1,64"})
    assert cfg == _ToyConfig(beta=0.25, k=7, mode="b", on=False, sizes=(1, 64))
    with pytest.raises(BadInput, match="unknown parameter 'gama'"):
        reg.config_from("alpha", {"gama": "1"})
    with pytest.raises(BadInput, match="must be an int"):
        reg.config_from("alpha", {"k": "seven"})
    with pytest.raises(BadInput, match="must be one of a, b"):
        reg.config_from("alpha", {"mode": "c"})


@pytest.mark.parametrize(
    "cfg",
    [TrainConfig(epochs=3, optimizer="adam"), ExportConfig(opset=18), BenchConfig(batch_sizes=(1, 8)),
     DataConfig("synthetic", options={"n": 10}), ModelConfig("resnet18"), PipelineConfig(seed=4)],
    ids=lambda c: type(c).__name__,
)
def test_configs_round_trip_through_json(cfg):
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["type"] == type(cfg).__name__ and d["version"] == 1
    assert config_from_dict(d) == cfg


def test_config_from_dict_refuses_unknown_types():
    with pytest.raises(BadInput, match="not a known config record"):
        config_from_dict({"type": "os.system", "params": {}})


def test_config_validation_states_the_fix():
    with pytest.raises(BadInput, match="epochs must be at least 1"):
        TrainConfig(epochs=0)
    with pytest.raises(BadInput, match="opset must be between"):
        ExportConfig(opset=7)
    with pytest.raises(TypeError):
        TrainConfig(epoch=3)  # a typo fails instead of creating a new attribute


def test_replace_ignores_none_like_unset_flags():
    cfg = TrainConfig(epochs=5)
    assert cfg.replace(epochs=None, lr=None) is cfg
    assert cfg.replace(epochs=2).epochs == 2


def test_pipeline_config_names_unknown_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epoch: 3\n")
    with pytest.raises(BadInput, match="unknown parameter 'epoch'"):
        PipelineConfig.load(p)
    p.write_text("data: {name: digits}\ntrain: {epochs: 2}\nbench: {batch_sizes: [1, 8]}\n")
    cfg = PipelineConfig.load(p, seed=3)
    assert cfg.train.epochs == 2 and cfg.bench.batch_sizes == (1, 8) and cfg.seed == 3


def test_every_registered_name_is_lowercase_and_listed():
    for reg in (MODELS, DATASETS):
        names = reg.names()
        assert names and all(n == n.lower() for n in names)
    assert {"smallcnn", "resnet18", "mobilenetv2"} <= set(MODELS.names())
    assert {"digits", "synthetic", "cifar10", "cifar100", "mnist", "svhn", "imagefolder", "npz"} <= set(DATASETS.names())
