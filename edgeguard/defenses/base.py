"""The defense interface: a torch module from logits to the probabilities a client receives.

Every defense is a :class:`Defense`: ``forward(logits, x=None)`` maps (N, C) float32 logits (and, for
defenses that need it, the (N, C, H, W) input images in [0, 1]) to (N, C) float32 output vectors.
Class attributes say how it ships:

- ``fusable``: the module exports to ONNX and is appended after the logits in FP32 (``edgeguard export
  --defense``); otherwise it runs on the host, around an undefended graph, through
  :class:`edgeguard.runtime.defended.HostDefenseRunner`.
- ``needs_input``: the module also reads the images (adaptive misinformation, MAD).
- ``emits_flag``: ``forward_with_flag`` also returns a per-row 0/1 flag (ModelGuard-S codebook misses).
- ``random``: outputs are random unless the config asks for the deterministic mode.

``reference`` is an independent NumPy float64 implementation used only by the tests.
Parameters come from a frozen :class:`~edgeguard.config.Config`; fields named in ``secret_params``
never reach the artifact's metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from edgeguard.config import Config
from edgeguard.errors import BadInput
from edgeguard.registry import Registry

DEFENSES = Registry("defense")

# ONNX ops a fused head may contain: all parse in TensorRT 8.5+ (onnx-tensorrt operator matrix) and run on
# ONNX Runtime's CPU provider.  Random ops only for the random mode of ``gaussian``.
ALLOWED_OPS = frozenset({
    "Softmax", "ReduceMax", "ReduceMin", "ReduceSum", "Sigmoid", "Log", "Exp", "Clip", "Div", "Sub", "Mul", "Add",
    "Neg", "Abs", "Sqrt", "Max", "Min", "ArgMax", "ArgMin", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "And", "Or", "Not", "Where", "Cast", "Round", "Floor", "Tanh", "MatMul", "Gemm", "Gather",
    "GatherElements", "ScatterElements", "Unsqueeze", "Squeeze", "Reshape", "Expand", "Shape", "Concat", "Slice",
    "TopK", "CumSum", "Identity", "Constant", "Tile", "Pow", "ReduceMean",
})
RANDOM_OPS = frozenset({"RandomNormalLike", "RandomUniformLike", "RandomNormal", "RandomUniform"})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


@dataclass
class DefenseContext:
    """What a defense may need to build itself: the protected model and the owner's data.

    ``train_images`` returns the owner's training images (float 0-1, NCHW) and labels;
    ``clean_predict`` returns the deployed model's undefended probabilities for images; ``model_factory``
    builds a fresh network of the protected architecture (for misinformation models and surrogates).
    Anything a defense needs but the context lacks is a BadInput at build time.
    """

    num_classes: int
    input_shape: tuple[int, int, int] | None = None
    train_images: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    clean_predict: Callable[[torch.Tensor], np.ndarray] | None = None
    model_factory: Callable[[], nn.Module] | None = None
    seed: int = 0
    quiet: bool | None = None


class Defense(nn.Module):
    """An output defense.  What it can do is declared here, on its class, and nowhere else: ``fusable`` (its
    default placement; :meth:`placement_for` decides per config), :meth:`preserves_top1` (a promise the pipeline
    checks), ``context_free`` (an attacker can rebuild its mapping from the published parameters alone: the
    adaptive attacks), ``random`` / :meth:`is_random`."""

    name: ClassVar[str] = ""
    fusable: ClassVar[bool] = True
    context_free: ClassVar[bool] = False
    keeps_top1: ClassVar[bool] = False  # the argmax is kept by construction, whatever the config
    needs_input: ClassVar[bool] = False
    emits_flag: ClassVar[bool] = False
    random: ClassVar[bool] = False
    secret_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Config | None, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.num_classes = int(num_classes)

    def forward(self, logits: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward_with_flag(self, logits: torch.Tensor, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities and a per-row flag (1.0 where the defense fell back); zeros unless ``emits_flag``."""
        q = self.forward(logits, x)
        return q, torch.zeros(q.shape[0], dtype=q.dtype)

    def reference(self, logits: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:  # pragma: no cover
        """NumPy float64 oracle of ``forward`` (tests only)."""
        raise NotImplementedError

    @classmethod
    def placement_for(cls, cfg: Any) -> str:
        """Where a defense with config ``cfg`` runs: ``graph`` (fused into the exported graph) or ``host``."""
        return "graph" if cls.fusable else "host"

    @classmethod
    def preserves_top1(cls, cfg: Any) -> bool:
        """Whether the defended argmax equals the undefended one by construction: ``keeps_top1``, else a config
        with ``top1_guard`` on."""
        return cls.keeps_top1 or bool(getattr(cfg, "top1_guard", False))

    @property
    def placement(self) -> str:
        return type(self).placement_for(self.cfg)

    def public_params(self) -> dict[str, Any]:
        """Parameters as recorded in the artifact's metadata (secret fields left out)."""
        if self.cfg is None:
            return {}
        return {k: v for k, v in self.cfg.params().items() if k not in self.secret_params}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.public_params(), "placement": self.placement,
                "fusable": self.placement == "graph", "random": self.is_random()}

    def is_random(self) -> bool:
        return self.random


# --- shared pieces -------------------------------------------------------------------------------------


def load_state(module: Defense, state: Any) -> Defense:
    """Load a host-side defense's saved ``state_dict()`` (its sidecar); a state that does not fit is a BadInput."""
    from collections.abc import Mapping


    if not isinstance(state, Mapping):
        raise BadInput(f"{module.name} state must be a state dict of tensors")
    try:
        module.load_state_dict(dict(state))
    except RuntimeError as e:
        raise BadInput(f"{module.name} state does not fit this model ({str(e).splitlines()[0]})") from None
    return module.eval()


def one_hot_of(index: torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    """(N, 1) int64 class indices -> (N, C) 0/1 float; Equal + Cast in ONNX (no OneHot: TensorRT 8.x lacks it)."""
    classes = torch.arange(num_classes, device=index.device).view(1, -1)
    return (index == classes).to(like.dtype)


TOP1_MARGIN = 1e-4


def preserve_top1(p: torch.Tensor, q: torch.Tensor, margin: float = TOP1_MARGIN) -> torch.Tensor:
    """Top-1 guard (docs/defenses.md): swap q's top entry back onto p's class, then add a margin.

    ``q' = q + (max q - q_k0)(e_k0 - e_k1)``; ``q'' = (q' + margin e_k0) / (1 + margin)``.  A no-op on rows
    whose argmax is already kept, apart from the margin.  Keeps q on the simplex when q is on it.
    """
    c = p.shape[-1]
    o0 = one_hot_of(p.argmax(-1, keepdim=True), c, q)
    o1 = one_hot_of(q.argmax(-1, keepdim=True), c, q)
    top = q.amax(-1, keepdim=True)
    q_k0 = (q * o0).sum(-1, keepdim=True)
    q = q + (top - q_k0) * (o0 - o1)
    return (q + margin * o0) / (1.0 + margin)


def preserve_top1_reference(p: np.ndarray, q: np.ndarray, margin: float = TOP1_MARGIN) -> np.ndarray:
    q = np.array(q, dtype=np.float64, copy=True)
    rows = np.arange(len(q))
    k0, k1 = p.argmax(-1), q.argmax(-1)
    top, q_k0 = q[rows, k1].copy(), q[rows, k0].copy()
    q[rows, k0] = top
    q[rows, k1] = np.where(k1 == k0, top, q_k0)
    q[rows, k0] += margin
    return q / (1.0 + margin)


def softmax_np(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
