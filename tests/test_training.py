"""The one training loop: it learns, it is seeded, and its hooks (extra, params, step, early stop) work."""

from __future__ import annotations

import pytest
import torch

from edgeguard.data import load_dataset
from edgeguard.errors import BadInput
from edgeguard.models import create_model
from edgeguard.training import Mix, TensorData, TrainConfig, augment_batch, fit


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def _model(data, seed=0, **kw):
    torch.manual_seed(seed)
    i = data.info
    return create_model("smallcnn", num_classes=10, in_channels=1, mean=i.mean, std=i.std, width=kw.get("width", 16), hidden=64)


def _acc(model, data):
    x, y = data.tensors()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_smallcnn_learns_digits_above_95_percent(digits):
    train, test = digits
    m = _model(train)
    res = fit(m, train, TrainConfig(epochs=5, lr=0.05, seed=0), val_data=test)
    assert _acc(m, test) >= 0.95
    assert res.history[-1]["loss"] < res.history[0]["loss"] / 5
    assert res.steps == 5 * 20  # ceil(1257 / 64) = 20 steps per epoch


def test_same_seed_same_weights(digits):
    train, _ = digits
    small = train.subset(range(256))
    a, b = _model(train), _model(train)
    fit(a, small, TrainConfig(epochs=1, seed=3, augment="shift"))
    fit(b, small, TrainConfig(epochs=1, seed=3, augment="shift"))
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), n
    c = _model(train)
    fit(c, small, TrainConfig(epochs=1, seed=4, augment="shift"))
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_extra_batches_are_mixed_into_every_step(digits):
    """Memorising 10 relabelled images works only if they are really seen every step."""
    train, _ = digits
    g = torch.Generator().manual_seed(0)
    keys = torch.rand(10, 1, 32, 32, generator=g)
    labels = torch.randperm(10, generator=g)
    m = _model(train)
    fit(m, train.subset(range(512)), TrainConfig(epochs=6, lr=0.05), extra=Mix(TensorData(keys, labels), batch_size=10))
    with torch.no_grad():
        assert (m(keys).argmax(1) == labels).float().mean() >= 0.9


def test_param_filter_freezes_everything_else(digits):
    train, _ = digits
    m = _model(train)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fit(m, train.subset(range(128)), TrainConfig(epochs=1, lr=0.1), params=lambda n, p: n.startswith("net.classifier"))
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"net.classifier.weight", "net.classifier.bias"} <= changed
    params = {n for n, _ in m.named_parameters()}
    frozen_changed = {k for k in changed & params if not k.startswith("net.classifier")}
    assert not frozen_changed  # conv, BN affine and net.fc weights untouched (BN running stats may move)
    assert any(k.startswith("net.fc") for k in params)
    assert all(p.requires_grad for p in m.parameters())  # restored after the run


def test_soft_labels_and_max_steps(digits):
    train, _ = digits
    x, y = train.tensors(0, 200)
    soft = torch.nn.functional.one_hot(y, 10).float() * 0.9 + 0.01
    m = _model(train)
    res = fit(m, TensorData(x, soft), TrainConfig(epochs=50, max_steps=7, batch_size=50))  # 4 steps per epoch
    assert res.steps == 7 and res.epochs == 2


def test_early_stop_restores_best(digits):
    train, test = digits
    m = _model(train)
    # lr so large that validation accuracy collapses after the first epochs: early stopping must trigger
    res = fit(m, train.subset(range(300)), TrainConfig(epochs=12, lr=3.0, momentum=0.0, schedule="none",
                                                       early_stop_patience=2), val_data=test)
    assert res.stopped_early and res.epochs < 12
    assert abs(_acc(m, test) - res.best_val_accuracy) < 1e-6


def test_custom_step_and_hooks(digits):
    train, _ = digits
    m = _model(train)
    seen = []

    class Hook:
        def on_step_end(self, state):
            seen.append(state.step)
            if state.step == 3:
                state.stop = True

    def step(state, x, y):
        return torch.nn.functional.cross_entropy(state.model(x), y)

    res = fit(m, train, TrainConfig(epochs=3), step=step, hooks=[Hook()])
    assert seen == [1, 2, 3] and res.steps == 3


def test_augment_shapes_and_identity():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 16, 16)
    assert torch.equal(augment_batch(x, "none", g), x)
    for mode in ("shift", "crop_flip"):
        out = augment_batch(x, mode, g)
        assert out.shape == x.shape
        assert not torch.equal(out, x)


def test_bad_training_inputs(digits):
    train, _ = digits
    with pytest.raises(BadInput, match="empty"):
        fit(_model(train), train.subset([]), TrainConfig(epochs=1))
    with pytest.raises(BadInput, match="no parameters"):
        fit(_model(train), train, TrainConfig(epochs=1), params=lambda n, p: False)


def test_divergence_is_a_failed_check_not_a_model(digits):
    from edgeguard.errors import CheckFailed

    train, _ = digits
    with pytest.raises(CheckFailed, match="diverged"):
        fit(_model(train), train.subset(range(128)), TrainConfig(epochs=3, lr=1e12, schedule="none"))


def test_stop_on_divergence_records_the_step_and_applies_no_update_from_it(digits):
    """With stop_on_divergence a non-finite loss ends training without an exception, and the parameters are left
    exactly as they were after the last step whose loss was finite (that loss's update is never applied)."""
    train, _ = digits
    model = _model(train)

    class Snapshot:
        last = None

        def on_step_end(self, state):
            Snapshot.last = (state.step, {k: v.clone() for k, v in state.model.state_dict().items()})

    res = fit(model, train.subset(range(128)), TrainConfig(epochs=3, lr=1e12, schedule="none"), stop_on_divergence=True,
              hooks=[Snapshot()])
    assert res.diverged_at is not None and res.steps == res.diverged_at <= 6
    assert res.to_json()["diverged_at"] == res.diverged_at
    step, state = Snapshot.last
    assert step == res.diverged_at - 1
    # parameters only: the diverging forward pass still moved BatchNorm's running statistics (train mode)
    assert all(torch.allclose(state[k], p, rtol=0, atol=0, equal_nan=True) for k, p in model.named_parameters())


def test_unknown_device_is_bad_input():
    with pytest.raises(BadInput, match="device must be cpu, cuda or cuda:N"):
        TrainConfig(device="gpu")


def test_channels_last_training_learns_the_same_task_and_hands_back_the_usual_layout():
    """fit(channels_last=True): NHWC during training (faster convolutions on CPU), contiguous weights afterwards,
    the same parameter objects, and a model as good as the default layout's."""
    import torch

    from edgeguard.data import load_dataset
    from edgeguard.models import create_model
    from edgeguard.training import TrainConfig, fit, model_accuracy

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    accs = []
    for cl in (False, True):
        torch.manual_seed(0)
        m = create_model("smallcnn", num_classes=10, in_channels=1)
        ids = [id(p) for p in m.parameters()]
        fit(m, train, TrainConfig(epochs=2, lr=0.05, seed=0), channels_last=cl, quiet=True)
        assert [id(p) for p in m.parameters()] == ids
        assert all(p.is_contiguous() for p in m.parameters())
        accs.append(model_accuracy(m, test, "cpu"))
    assert min(accs) > 0.9 and abs(accs[0] - accs[1]) < 0.03, accs
