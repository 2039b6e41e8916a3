"""Adversarial Robustness Toolbox (ART) as a peer: edgeguard artifacts and defenses inside ART scripts.

- :func:`as_art_classifier` makes any artifact edgeguard opens (bundle, ONNX graph, TensorRT engine, server URL),
  an open Runner or a budgeted :class:`~edgeguard.attacks.extraction.QueryOracle` an ART ``BlackBoxClassifier``:
  every ``predict`` goes through the Runner, so queries are counted (and a budget enforced) as for edgeguard's own
  attacks.
- :func:`as_art_postprocessor` makes an edgeguard output defense an ART ``Postprocessor``: the defense's own
  torch module (what ``export --defense`` fuses into the graph) applied to ART's probabilities, read as logits
  ``log p`` (``softmax(log p) = p``), in float64 so that rows next to 1 keep their ``1 - p``.  Defenses that read the images or need the owner's data (adaptive
  misinformation, MAD, ModelGuard) cannot run where ART only hands over probabilities and are refused.
- ``attack extract --method art:knockoff`` / ``art:copycat`` (:mod:`edgeguard.attacks.extraction.art_attacks`)
  run ART's own implementations through the same oracle and pool.

ART is the optional extra ``edgeguard[art]`` (``adversarial-robustness-toolbox``); it is imported only here, on use.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeguard.errors import BackendUnavailable, BadInput

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

    from edgeguard.attacks.extraction.base import QueryOracle
    from edgeguard.runtime import Runner, open_runner

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

    from edgeguard.defenses import DefenseContext, defense_class, make_defense

    cls = defense_class(name)
    if cls.needs_input:
        raise BadInput(f"defense {name!r} reads the query images; an ART postprocessor only sees probabilities")
    try:
        defense = make_defense(name, params, DefenseContext(num_classes=num_classes, seed=seed))
    except BadInput as e:
        raise BadInput(f"defense {name!r} cannot run as an ART postprocessor: {e}") from None
    return _postprocessor_class()(defense)
