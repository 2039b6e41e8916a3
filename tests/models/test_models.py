"""Contract tests for every registered model: shapes, gradients, head swap, state-dict round-trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeguard.errors import BadInput
from edgeguard.models import MODELS, Normalize, count_parameters, create_model

NAMES = MODELS.names()
NEW_ARCHS = ("resnet18", "resnet34", "mobilenetv2")


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(old, 2))
    yield
    torch.set_num_threads(old)


def _make(name: str, c: int = 3, num_classes: int = 7, seed: int = 0, **options):
    torch.manual_seed(seed)
    return create_model(
        name, num_classes=num_classes, in_channels=c, mean=(0.5,) * c, std=(0.25,) * c, **options
    )


def _x(c: int, n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_forward_backward(name, c):
    model = _make(name, c).train()
    out = model(_x(c))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    loss = nn.functional.cross_entropy(out, torch.tensor([0, 3]))
    loss.backward()
    w = model.classifier.weight.grad
    assert w is not None and torch.isfinite(w).all() and w.abs().sum() > 0
    first = next(model.net.parameters())  # gradient reaches the stem, not just the head
    assert first.grad is not None and first.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_classifier_contract_and_reset(name):
    model = _make(name, 1).eval()
    head = model.classifier
    assert isinstance(head, nn.Linear) and head.out_features == 7
    x = _x(1)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, head.in_features)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        model.reset_classifier(5, generator=torch.Generator().manual_seed(0))
        assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == 5
        assert model.classifier is model.net.classifier
        assert model(x).shape == (2, 5)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_roundtrip(name, tmp_path):
    src = _make(name, 3, seed=0).train()
    with torch.no_grad():
        src(_x(3, n=4, seed=2))  # move BN running stats off their defaults
    path = tmp_path / "model.pt"
    torch.save(src.state_dict(), path)
    dst = _make(name, 3, seed=123)
    dst.load_state_dict(torch.load(path, weights_only=True))
    src.eval()
    dst.eval()
    x = _x(3)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


@pytest.mark.parametrize("name", NAMES)
def test_normalize_is_first(name):
    model = _make(name, 3).eval()
    assert isinstance(next(iter(model.children())), Normalize)
    x = _x(3)
    with torch.no_grad():
        before = model(x)
        model.normalize.mean.fill_(0.1)
        after = model(x)
    assert not torch.allclose(before, after, rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("name", NEW_ARCHS)
@pytest.mark.parametrize(("c", "size"), [(1, 8), (3, 48)])
def test_other_input_sizes(name, c, size):
    model = _make(name, c).eval()
    with torch.no_grad():
        out = model(_x(c, n=1, size=size))
    assert out.shape == (1, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", NEW_ARCHS)
def test_no_inplace_activations(name):
    model = _make(name, 3)
    assert not [m for m in model.modules() if getattr(m, "inplace", False)]


def test_unknown_name_lists_known():
    with pytest.raises(BadInput) as info:
        create_model("no_such_model", num_classes=10)
    for name in NAMES:
        assert name in str(info.value)


def test_bad_option_is_bad_input():
    with pytest.raises(BadInput):
        create_model("resnet18", num_classes=10, no_such_option=1)


def test_mobilenetv2_options():
    model = _make("mobilenetv2", 3, width_mult=0.5, dropout=0.2)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.2 for m in model.modules())
    assert count_parameters(model) < count_parameters(_make("mobilenetv2", 3))
    model.eval()
    x = _x(3)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # dropout is off in eval


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("resnet18", 11.17e6 * 0.99, 11.17e6 * 1.01),
        ("resnet34", 21.28e6 * 0.99, 21.28e6 * 1.01),
        ("mobilenetv2", 2.2e6, 2.4e6),
    ],
)
def test_parameter_counts(name, low, high):
    n = count_parameters(create_model(name, num_classes=10))
    assert low <= n <= high, n


@pytest.mark.parametrize("name", NAMES)
def test_untrained_eval_output_not_degenerate(name):
    model = _make(name, 3).eval()
    with torch.no_grad():
        out = model(_x(3, n=4))
    assert out.std() > 1e-3  # a fresh model's logits must not vanish (init sanity)


RESIDUAL_ADDS = {"resnet18": 8, "resnet34": 16, "mobilenetv2": 10}


@pytest.mark.parametrize("name", NAMES)
def test_torch_export(name):
    model = _make(name, 3).eval()
    x = _x(3)
    ep = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x))
    if name in RESIDUAL_ADDS:  # residual adds stay plain aten.add so PT2E can annotate them
        adds = [n for n in ep.graph.nodes if n.target == torch.ops.aten.add.Tensor]
        assert len(adds) == RESIDUAL_ADDS[name]
