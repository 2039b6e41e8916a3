"""Adversarial Robustness Toolbox (ART) as a peer: edgeguard artifacts and defenses inside ART scripts.

- :func:`as_art_classifier` makes any artifact edgeguard opens (bundle, ONNX graph, TensorRT engine, server URL),
  an open Runner or a budgeted :class:`~edgeguard.attacks.extraction.QueryOracle` an ART ``BlackBoxClassifier``:
  every ``predict`` goes through the Runner, so queries are counted (and a budget enforced) as for edgeguard's own
  attacks.
- :func:`as_art_postprocessor` makes an edgeguard output defense an ART ``Postprocessor``: the defense's own
  torch module (what ``export --defense`` fuses into the graph) applied to ART's probabilities, read as logits
  ``log p`` (``softmax(log p) = p``), in float64 so that rows next to 1 keep their ``1 - p``.  Defenses that read
  the images (adaptive misinformation, MAD) cannot run where ART only hands over probabilities and are refused.
- ``attack extract --method art:knockoff`` / ``art:copycat`` (below) run ART's own implementations through the
  same oracle and pool.

ART is the optional extra ``edgeguard[art]`` (``adversarial-robustness-toolbox``); it is imported only here, on use.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from edgeguard.attacks.base import ATTACKS
from edgeguard.attacks.extraction.base import ExtractionConfig, ExtractionContext, QueryOracle
from edgeguard.config import require
from edgeguard.defenses import DefenseContext, defense_class, make_defense
from edgeguard.errors import BackendUnavailable, BadInput
from edgeguard.runtime import Runner, open_runner

ART_VERSION = "1.20.1"  # the version the parity tests pin


def require_art():
    """Import ART or say how to install it (exit 3)."""
    try:
        import art
    except ImportError:
        raise BackendUnavailable("this needs the Adversarial Robustness Toolbox: pip install 'edgeguard[art]'") from None
    return art


def as_art_classifier(target: Any, *, budget: int | None = None, hard_label: bool = False, postprocessors=(),
                      batch_size: int = 256):
    """An ART ``BlackBoxClassifier`` whose predictions come from ``target`` through edgeguard's query oracle.

    ``target``: a path or URL (opened with :func:`edgeguard.runtime.open_runner` and closed with the classifier's
    ``close``), an open Runner, or a ``QueryOracle`` (its budget and counters are used as they are).  ``budget``
    caps the queries (default: unlimited); the oracle is ``classifier.edgeguard_oracle``."""

    require_art()
    from art.estimators.classification import BlackBoxClassifier

    owned = None
    if isinstance(target, QueryOracle):
        oracle = target
    else:
        if isinstance(target, (str, Path)):
            runner = owned = open_runner(target)
        elif isinstance(target, Runner):
            runner = target
        else:
            raise BadInput(f"as_art_classifier takes a path, URL, Runner or QueryOracle, not {type(target).__name__}")
        oracle = QueryOracle(runner, budget if budget is not None else 2**62, hard_label=hard_label,
                             batch_size=batch_size)
    shape = tuple(oracle.input_shape)
    if not all(shape):
        raise BadInput(f"{oracle.runner.info.path} has a dynamic input size; an ART classifier needs a fixed C x H x W")

    def predict(x: np.ndarray) -> np.ndarray:
        return oracle.query(np.asarray(x, dtype=np.float32)).numpy().astype(np.float32)

    clf = BlackBoxClassifier(predict, input_shape=shape, nb_classes=oracle.num_classes, clip_values=(0.0, 1.0),
                             postprocessing_defences=list(postprocessors) or None)
    clf.edgeguard_oracle = oracle
    clf.close = owned.close if owned is not None else (lambda: None)
    return clf


@functools.cache
def _postprocessor_class():
    require_art()
    from art.defences.postprocessor import Postprocessor

    class EdgeguardPostprocessor(Postprocessor):
        """An edgeguard defense applied to ART's probabilities (as logits ``log p``)."""

        params = ["defense"]

        def __init__(self, defense, *, apply_fit: bool = False, apply_predict: bool = True):
            super().__init__(is_fitted=True, apply_fit=apply_fit, apply_predict=apply_predict)
            # float64: softmax(log p) must give back p itself, also next to 1 where float32 loses 1 - p
            self.defense = copy.deepcopy(defense).double().eval()

        def __call__(self, preds: np.ndarray) -> np.ndarray:
            p = np.asarray(preds, dtype=np.float64)
            if p.ndim != 2 or p.shape[1] != self.defense.num_classes:
                raise BadInput(f"the {self.defense.name} postprocessor is for {self.defense.num_classes} classes; "
                               f"ART passed predictions of shape {tuple(p.shape)}")
            with np.errstate(divide="ignore"):
                logits = torch.from_numpy(np.log(p))  # an exact 0 stays -inf: softmax gives it back as 0
            with torch.no_grad():
                return self.defense(logits).numpy().astype(np.float32)

    return EdgeguardPostprocessor


def as_art_postprocessor(name: str, params: Mapping[str, Any] | None = None, *, num_classes: int, seed: int = 0):
    """The edgeguard defense ``name`` (registry name and parameters, as for ``export --defense``) as an ART
    ``Postprocessor`` for ``num_classes``-class probabilities."""

    cls = defense_class(name)
    if cls.needs_input:
        raise BadInput(f"defense {name!r} reads the query images; an ART postprocessor only sees probabilities")
    try:
        defense = make_defense(name, params, DefenseContext(num_classes=num_classes, seed=seed))
    except BadInput as e:
        raise BadInput(f"defense {name!r} cannot run as an ART postprocessor: {e}") from None
    return _postprocessor_class()(defense)


# --- ART's extraction attacks ------------------------------------------------------------------------------
#
# ART's own extraction attacks (``art:knockoff``, ``art:copycat``) through edgeguard's oracle and pool.
#
# The victim is the deployed artifact behind the same budgeted :class:`QueryOracle` as edgeguard's attacks (wrapped
# by :func:`as_art_classifier`); the thief is ART's ``PyTorchClassifier`` around the same
# surrogate architecture; the pool is the same query set.  What ART does differently stays ART's:
#
# - ``KnockoffNets`` (random policy) and ``CopycatCNN`` draw ``nb_stolen`` pool images without replacement with
#   NumPy's global generator (seeded here from ``seed``, and restored afterwards) and query each once.
# - ``PyTorchClassifier.fit`` reduces label vectors to their argmax when the loss is ``torch.nn.CrossEntropyLoss``
#   (``loss=ce``, what an ART script writes): the surrogate learns from hard labels even with
#   ``use_probability=True``.  ``loss=soft`` keeps the vectors (soft-label cross-entropy, as edgeguard's attack).
# - No learning-rate schedule and no augmentation.  ART's own default ``batch_size_fit`` is 1; here it defaults to
#   ``batch_size`` (64), so that the two protocols differ only where named.


@dataclass(frozen=True)
class ArtExtractionConfig(ExtractionConfig):
    batch_size_fit: int = 0  # ART's surrogate batch size (0: batch_size; ART's own default is 1)
    use_probability: bool = True  # ART queries keep the probability vectors (else ART one-hots them)
    loss: Literal["ce", "soft"] = "ce"  # ce: torch CrossEntropyLoss (ART trains on the argmax); soft: soft-label CE
    optimizer: Literal["sgd", "adam"] = "sgd"  # sgd: momentum 0.9, weight decay 5e-4 (edgeguard's training defaults)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.batch_size_fit >= 0, "batch_size_fit must be >= 0 (0: batch_size)")
        require(self.loss in ("ce", "soft"), f"loss must be ce or soft (got {self.loss!r})")
        require(self.optimizer in ("sgd", "adam"), f"optimizer must be sgd or adam (got {self.optimizer!r})")
        require(self.augment == "none", "ART's attacks train without augmentation: leave augment at none")


class SoftCrossEntropy(nn.Module):
    """``-sum(y * log_softmax(z))`` averaged over the batch; ART leaves the label vectors of this loss as they are."""

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -(y.float() * torch.log_softmax(logits, dim=1)).sum(1).mean()


@contextlib.contextmanager
def _seeded(seed: int):
    """ART samples with NumPy's global generator and trains with torch's: seed both, restore both after."""
    np_state, torch_state = np.random.get_state(), torch.random.get_rng_state()
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)


def _run_art(which: str, oracle: QueryOracle, pool, cfg: ArtExtractionConfig, ctx: ExtractionContext) -> nn.Module:
    art = require_art()
    from art.attacks.extraction import CopycatCNN, KnockoffNets
    from art.estimators.classification import PyTorchClassifier

    x = pool.tensors()[0].numpy().astype(np.float32)
    n = min(len(x), oracle.remaining)
    model = ctx.make_surrogate()
    opt = (torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4) if cfg.optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=cfg.lr))
    thief = PyTorchClassifier(model, loss=nn.CrossEntropyLoss() if cfg.loss == "ce" else SoftCrossEntropy(),
                              optimizer=opt, input_shape=tuple(ctx.input_shape), nb_classes=ctx.num_classes,
                              clip_values=(0.0, 1.0), device_type="cpu")
    common = dict(batch_size_fit=cfg.batch_size_fit or cfg.batch_size, batch_size_query=oracle.batch_size,
                  nb_epochs=cfg.epochs, nb_stolen=n, use_probability=cfg.use_probability)
    attack = (KnockoffNets(as_art_classifier(oracle), sampling_strategy="random", verbose=False, **common)
              if which == "knockoff" else CopycatCNN(as_art_classifier(oracle), **common))
    with _seeded(cfg.seed):
        attack.extract(x, thieved_classifier=thief)
    ctx.log.update({"transfer_set": n, "art_version": art.__version__,
                    "labels": "argmax (ART reduces label vectors for CrossEntropyLoss)" if cfg.loss == "ce"
                    else "probability vectors", "batch_size_fit": common["batch_size_fit"]})
    return model.eval()


@ATTACKS.register("art:knockoff", family="extraction", config=ArtExtractionConfig, needs_pool=True)
def art_knockoff(oracle: QueryOracle, pool, cfg: ArtExtractionConfig, ctx: ExtractionContext) -> nn.Module:
    """ART's ``KnockoffNets`` (random sampling strategy)."""
    return _run_art("knockoff", oracle, pool, cfg, ctx)


@ATTACKS.register("art:copycat", family="extraction", config=ArtExtractionConfig, needs_pool=True)
def art_copycat(oracle: QueryOracle, pool, cfg: ArtExtractionConfig, ctx: ExtractionContext) -> nn.Module:
    """ART's ``CopycatCNN``."""
    return _run_art("copycat", oracle, pool, cfg, ctx)
