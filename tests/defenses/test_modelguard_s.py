"""ModelGuard-S (docs/defenses.md): online rule, first fit, frozen graph, cover, fallbacks.

Synthetic softmax vectors only (Dirichlet draws and logits with a random scale), no model training.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgeguard.defenses import defense_config, make_defense
from edgeguard.defenses.base import ALLOWED_OPS, DEFENSES, DefenseContext, softmax_np
from edgeguard.defenses.codebook import build_codebook, build_codebook_report
from edgeguard.defenses.modelguard_s import ModelGuardS, ModelGuardSConfig
from edgeguard.errors import BadInput
from edgeguard.progress import silenced


def synth_logits(n: int, k: int, seed: int) -> np.ndarray:
    """Half logits with a random temperature, half log-Dirichlet draws: confident and flat outputs mixed."""
    rng = np.random.default_rng(seed)
    h = n // 2
    z = rng.normal(size=(h, k)) * rng.uniform(0.3, 6.0, size=(h, 1))
    d = rng.dirichlet(np.full(k, 0.3), size=n - h) + 1e-6
    out = np.concatenate([z, np.log(d)], axis=0)
    return out[rng.permutation(n)].astype(np.float32)


def probs32(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits), -1).numpy()


def l1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.float64) - b.astype(np.float64)).sum(-1)


def run_flag(module: ModelGuardS, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        q, f = module.forward_with_flag(torch.from_numpy(logits))
    return q.numpy(), f.numpy()


# --- item 4: the paper's online rule ---------------------------------------------------------------


@pytest.mark.parametrize("k,n", [(10, 5000), (100, 1500)])
def test_online_rule_bound_top1_codewords_growth_and_consistency(k, n):
    cfg = ModelGuardSConfig(epsilon=1.0, assign="first", online=True)
    m = ModelGuardS.empty(cfg, k)
    assert m.placement == "host" and m.codebook_size() == 0
    z = synth_logits(n, k, seed=k)
    p = probs32(z)
    outs, flags, prev = [], [], m.codebooks()
    for s in range(0, n, 250):  # rows in order, batch after batch
        q, f = run_flag(m, z[s:s + 250])
        outs.append(q)
        flags.append(f)
        now = m.codebooks()
        for a, b in zip(prev, now, strict=True):  # codebooks only grow: the old one is a prefix
            assert len(b) >= len(a) and np.array_equal(b[:len(a)], a)
        prev = now
    q, f = np.concatenate(outs), np.concatenate(flags)
    assert (l1(q, p) <= cfg.epsilon).all()
    assert (q.argmax(1) == p.argmax(1)).all()
    books = m.codebooks()
    for cls in range(k):  # every answer is a codeword of its class
        rows = q[p.argmax(1) == cls]
        if len(rows):
            assert (rows[:, None, :] == books[cls][None]).all(-1).any(1).all()
    assert f.sum() == m.codebook_size() == m.stats()["flagged"]  # a miss creates exactly one codeword
    assert m.stats()["queries"] == n
    again, f_again = run_flag(m, z[:1000])  # re-query after all others: bit-identical, no misses
    assert np.array_equal(again, q[:1000]) and not f_again.any()
    assert m.codebook_size() == f.sum()


def test_online_matches_reference_replay():
    cfg = ModelGuardSConfig(epsilon=0.5, assign="first", online=True)
    z = synth_logits(2000, 10, seed=7)
    m = ModelGuardS.empty(cfg, 10)
    ref_q, ref_f = m.reference_with_flag(z)  # replays on a copy: no side effects
    assert m.codebook_size() == 0
    q, f = run_flag(m, z)
    np.testing.assert_allclose(q, ref_q, atol=1e-6, rtol=0)
    assert np.array_equal(f, ref_f)


def test_online_nearest_picks_within_eps_and_grows_on_miss():
    cfg = ModelGuardSConfig(epsilon=0.5, assign="nearest", online=True)
    z = synth_logits(1000, 10, seed=3)
    m = ModelGuardS.empty(cfg, 10)
    ref_q, ref_f = m.reference_with_flag(z)
    q, f = run_flag(m, z)
    np.testing.assert_allclose(q, ref_q, atol=1e-6, rtol=0)
    assert np.array_equal(f, ref_f) and f.sum() == m.codebook_size()
    assert (l1(q, probs32(z)) <= 0.5).all()


# --- item 5: first fit versus nearest ----------------------------------------------------------------


def _hand_built(assign: str, eps: float, online: bool = False) -> ModelGuardS:
    books = [np.array([[0.6, 0.3, 0.1], [0.7, 0.2, 0.1]]), np.array([[0.2, 0.5, 0.3]]), np.zeros((0, 3))]
    return ModelGuardS.from_codebook(ModelGuardSConfig(epsilon=eps, assign=assign, online=online), 3, books)


@pytest.mark.parametrize("online", [False, True])
def test_first_fit_returns_the_earlier_codeword_nearest_the_nearer(online):
    y = np.array([[0.72, 0.18, 0.10]])  # L1 0.24 to codeword 0, 0.04 to codeword 1
    z = np.log(y).astype(np.float32)
    expect = {("first", 0.3): 0, ("nearest", 0.3): 1, ("first", 0.1): 1}
    for (assign, eps), i in expect.items():
        m = _hand_built(assign, eps, online)
        q, f = run_flag(m, z)
        want = np.array([[0.6, 0.3, 0.1], [0.7, 0.2, 0.1]], dtype=np.float32)[i]
        np.testing.assert_array_equal(q[0], want)
        assert f[0] == 0.0 and m.codebook_size() == 3  # a hit never grows the codebook
        np.testing.assert_allclose(m.reference(z)[0], want, atol=1e-7)


# --- fallbacks: miss and empty class -------------------------------------------------------------------


def test_frozen_miss_gets_nearest_codeword_of_its_class_and_the_flag():
    m = _hand_built("first", 0.1)
    y = np.array([[0.95, 0.03, 0.02], [0.3, 0.4, 0.3]])  # class 0 far from both codewords; class 1 far too
    q, f = run_flag(m, np.log(y).astype(np.float32))
    np.testing.assert_array_equal(q, np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]], dtype=np.float32))
    np.testing.assert_array_equal(f, [1.0, 1.0])
    rq, rf = m.reference_with_flag(np.log(y))
    np.testing.assert_allclose(rq, q, atol=1e-7)
    np.testing.assert_array_equal(rf, f)


def test_class_without_codeword_gets_one_hot_and_the_flag():
    m = _hand_built("nearest", 1.0)
    y = np.array([[0.1, 0.3, 0.6], [0.2, 0.2, 0.6]])  # class 2 has no codeword
    q, f = run_flag(m, np.log(y).astype(np.float32))
    np.testing.assert_array_equal(q, [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(f, [1.0, 1.0])
    rq, rf = m.reference_with_flag(np.log(y))
    np.testing.assert_array_equal(rq, q)
    np.testing.assert_array_equal(rf, f)
    assert m(torch.from_numpy(np.log(y).astype(np.float32))).shape == (2, 3)  # forward: q only


def test_codebooks_must_keep_their_class():
    with pytest.raises(BadInput, match="argmax"):
        ModelGuardS.from_codebook(ModelGuardSConfig(), 3, [np.array([[0.2, 0.7, 0.1]]), np.zeros((0, 3)), np.zeros((0, 3))])


# --- the offline cover (docs/defenses.md) ------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.5, 1.0])
def test_codebook_covers_every_training_output(eps):
    z = synth_logits(2000, 10, seed=11)
    p = probs32(z)
    books = build_codebook(p, eps, max_codewords=256)
    for cls, b in enumerate(books):
        assert b.dtype == np.float32 and (len(b) == 0 or (b.argmax(1) == cls).all())
        x = p[p.argmax(1) == cls]
        if len(x):
            assert (l1(x[:, None, :], b[None]).min(1) <= eps).all()
    m = ModelGuardS.from_codebook(ModelGuardSConfig(epsilon=eps), 10, books)
    q, f = run_flag(m, z)
    assert not f.any() and (l1(q, p) <= eps).all() and (q.argmax(1) == p.argmax(1)).all()


def test_max_codewords_stops_the_cover_and_the_rest_is_flagged():
    z = synth_logits(1500, 10, seed=5)
    p = probs32(z)
    r = build_codebook_report(p, 0.2, max_codewords=3)
    assert max(len(b) for b in r.codebooks) <= 3 and sum(r.uncovered) > 0
    m = ModelGuardS.from_codebook(ModelGuardSConfig(epsilon=0.2, max_codewords=3), 10, r.codebooks)
    q, f = run_flag(m, z)
    d = np.array([l1(p[i], m.codebooks()[c]).min() for i, c in enumerate(p.argmax(1))])
    np.testing.assert_array_equal(f, (d > 0.2).astype(np.float32))
    assert int(f.sum()) == sum(r.uncovered)
    assert (q.argmax(1) == p.argmax(1)).all()  # misses still keep top-1 (nearest codeword of the class)


# --- item 6: the frozen graph ---------------------------------------------------------------------------


class _Head(nn.Module):
    def __init__(self, d: ModelGuardS):
        super().__init__()
        self.d = d

    def forward(self, logits):
        return self.d.forward_with_flag(logits)


def export_head(module: ModelGuardS):
    batch = torch.export.Dim("batch", min=1, max=65536)
    with silenced("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
        prog = torch.onnx.export(_Head(module).eval(), (torch.randn(2, module.num_classes),), None, dynamo=True,
                                 external_data=False, opset_version=20, input_names=["logits"],
                                 output_names=["q", "flag"], dynamic_shapes=({0: batch},), verbose=False)
    return prog.model_proto


@pytest.mark.parametrize("assign", ["first", "nearest"])
def test_frozen_graph_matches_torch_and_reference(assign):
    k, eps = 10, 0.5
    books = build_codebook(probs32(synth_logits(1500, k, seed=21)), eps)
    books[4] = np.zeros((0, k), np.float32)  # one class without codewords: one-hot path
    m = ModelGuardS.from_codebook(ModelGuardSConfig(epsilon=eps, assign=assign), k, books)
    assert m.placement == "graph"
    proto = export_head(m)
    assert {n.op_type for n in proto.graph.node} <= ALLOWED_OPS
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])

    z = synth_logits(10_000, k, seed=22)
    oq, of = sess.run(None, {"logits": z})
    tq, tf = run_flag(m, z)
    rq, rf = m.reference_with_flag(z.astype(np.float64))
    for bs in (1, 64):  # dynamic batch
        bq, bf = sess.run(None, {"logits": z[:bs]})
        np.testing.assert_array_equal(bq, oq[:bs])
        np.testing.assert_array_equal(bf, of[:bs])

    # rows where float rounding may legitimately change the choice: a distance within 1e-5 of eps, or
    # (nearest) two candidates within 1e-5 of each other
    p = softmax_np(z.astype(np.float64))
    cls = p.argmax(1)
    ambiguous = np.zeros(len(z), bool)
    for i in range(len(z)):
        b = books[cls[i]]
        if len(b):
            d = np.sort(l1(p[i], b))
            ambiguous[i] = np.abs(d - eps).min() < 1e-5 or (assign == "nearest" and len(d) > 1 and d[1] - d[0] < 1e-5)
    ok = ~ambiguous
    assert ok.mean() > 0.99
    assert 0 < of.sum() < len(z)  # both hits and misses are exercised
    assert (of[cls == 4] == 1).all() and (oq[cls == 4] == np.eye(k, dtype=np.float32)[4]).all()
    np.testing.assert_allclose(oq[ok], rq[ok], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(of[ok], rf[ok])
    np.testing.assert_allclose(oq[ok], tq[ok], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(of[ok], tf[ok])
    assert (oq.argmax(1) == cls).all()


# --- state, builder, config -------------------------------------------------------------------------


def test_state_dict_round_trip_resizes_and_continues_identically():
    cfg = ModelGuardSConfig(epsilon=0.5, assign="first", online=True)
    a = ModelGuardS.empty(cfg, 10)
    z = synth_logits(1200, 10, seed=9)
    run_flag(a, z[:600])
    b = ModelGuardS.empty(cfg, 10)
    b.load_state_dict(a.state_dict())
    assert b.codebook_size() == a.codebook_size() > 0
    assert all(np.array_equal(x, y) for x, y in zip(a.codebooks(), b.codebooks(), strict=True))
    qa, fa = run_flag(a, z[600:])
    qb, fb = run_flag(b, z[600:])
    assert np.array_equal(qa, qb) and np.array_equal(fa, fb)

    frozen = ModelGuardS.from_codebook(ModelGuardSConfig(epsilon=0.5), 10, a.codebooks())
    c = ModelGuardS.empty(ModelGuardSConfig(epsilon=0.5), 10)
    c.load_state_dict(frozen.state_dict())
    assert c.codebook.shape == frozen.codebook.shape
    assert np.array_equal(run_flag(c, z)[0], run_flag(frozen, z)[0])


def test_restore_from_a_host_sidecar_state():
    cfg = ModelGuardSConfig(epsilon=0.5, assign="first", online=True)
    a = ModelGuardS.empty(cfg, 10)
    z = synth_logits(800, 10, seed=12)
    run_flag(a, z[:400])
    state = {k: v.clone() for k, v in a.state_dict().items()}
    restore = DEFENSES.entry("modelguard_s").meta["restore"]
    b = restore(cfg, DefenseContext(num_classes=10), state)
    assert b.codebook_size() == a.codebook_size() and b.placement == "host"
    assert np.array_equal(run_flag(a, z[400:])[0], run_flag(b, z[400:])[0])
    with pytest.raises(BadInput, match="does not fit"):
        restore(cfg, DefenseContext(num_classes=5), state)


def _ctx(n: int = 600, k: int = 10) -> DefenseContext:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, 8, 8, generator=g)
    w = torch.randn(64, k, generator=g) * 3.0

    def clean_predict(x: torch.Tensor) -> np.ndarray:
        return torch.softmax(x.reshape(len(x), -1) @ w, -1).numpy()

    return DefenseContext(num_classes=k, input_shape=(1, 8, 8), train_images=lambda: (images, torch.zeros(n)),
                          clean_predict=clean_predict, quiet=True)


def test_builder_builds_from_the_training_outputs():
    ctx = _ctx()
    m = make_defense("modelguard_s", {"epsilon": "0.5", "max_samples": "400"}, ctx)
    assert isinstance(m, ModelGuardS) and m.codebook_size() > 0 and sum(m.build_report.points) == 400
    assert m.describe()["placement"] == "graph"
    images, _ = ctx.train_images()
    p = ctx.clean_predict(images)
    q, _ = run_flag(m, np.log(p).astype(np.float32))
    assert (q.argmax(1) == p.argmax(1)).all()
    online = make_defense("modelguard_s", {"online": "true", "max_samples": "400", "epsilon": "0.5"}, ctx)
    assert online.placement == "host" and online.codebook_size() == m.codebook_size()
    with pytest.raises(BadInput, match="training data; none was given"):
        make_defense("modelguard_s", {}, DefenseContext(num_classes=10))


@pytest.mark.parametrize("params", [{"epsilon": 0}, {"epsilon": "-0.5"}, {"epsilon": 2.5}, {"max_codewords": 0},
                                    {"assign": "best"}, {"max_samples": 0}])
def test_bad_parameters_are_bad_input(params):
    with pytest.raises(BadInput):
        defense_config("modelguard_s", params)


def test_config_accepts_the_range_ends():
    assert defense_config("modelguard_s", {"epsilon": "2"}).epsilon == 2.0
    assert defense_config("modelguard_s", {}).assign == "nearest"
