"""MagicGuard: self-destruction against fine-tuning, ``y = x + a·sin(w·x)`` at the logits or after a named layer.

Method: docs/magicguard.md.  The forward change is bounded by ``a`` (the top-1 cannot change where
the top-2 logit gap exceeds 2a); the backward multiplier ``1 + a·w·cos(w·x)`` has amplitude ``a·w`` (100 by
default) with an effectively random phase, so gradient-based fine-tuning through the guard drives the weights
off their minimum and accuracy collapses.  There are no weights and no training: inserting the guard is a
graph edit (:func:`attach`), and :func:`protect_magicguard` writes a guarded bundle after checking fidelity.

* The guard lives in the model: at the logits it is ``EdgeModel.guard``; after a hidden layer the layer is
  wrapped as ``GuardedSite(layer, guard)``.  Its configuration (``a``, ``w``, site, ratio, variant) is recorded
  in the bundle manifest (``magicguard``), so ``Bundle.load_model`` rebuilds the guarded model, and the
  amplitude, frequency and unit mask are buffers in ``model.pt``.
* The unit mask (``ratio`` < 1) is drawn once from ``seed`` at protection time and stored; never per pass.
* ``owner_gradients(model)`` detaches the ripple (straight-through): the forward is identical and the owner
  can still fine-tune or QAT.  edgeguard's own gradient steps on a guarded model (QAT, watermark embedding)
  run inside it; attacks never do.
* The guard is computed in FP32 whatever the input dtype.  ``w·x`` overflows FP16 (65504) for |x| > 65504/w,
  so exports keep the guard's nodes out of quantization and list them in the graph metadata
  (``magicguard.nodes``) for FP32 pinning in TensorRT (:func:`guard_nodes`).
* Variants (docs/magicguard.md): ``sine`` (function 0, the method), ``staircase`` (``a·floor(x/a)``: no gradient reaches
  the model, fine-tuning becomes a no-op) and ``reversal`` (``2·s(x) - x`` with ``s`` a staircase of step a/2:
  the gradient is exactly reversed, fine-tuning ascends the loss).  All three change any value by less than a.

Limitation (docs/magicguard.md): the guard is a visible ``Sin`` in any exported graph; an informed attacker deletes it
(:func:`strip`) and fine-tunes normally.  It does nothing against extraction or distillation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from edgeguard.config import Config, require
from edgeguard.errors import BadInput, CheckFailed

LOGITS = "logits"
MANIFEST_KEY = "magicguard"
VARIANTS = ("sine", "staircase", "reversal")


@dataclass(frozen=True)
class MagicGuardConfig(Config):
    a: float = 0.01  # amplitude: the largest change of any guarded value
    w: float = 1e4  # frequency (sine); a*w is the backward amplitude, 100 by default
    site: str = LOGITS  # "logits" or the dotted module path of a layer whose output is guarded
    ratio: float = 1.0  # share of units (features / channels) guarded; the mask is drawn once from `seed`
    seed: int = 0
    variant: Literal["sine", "staircase", "reversal"] = "sine"

    def __post_init__(self) -> None:
        require(isinstance(self.a, (int, float)) and math.isfinite(self.a) and self.a > 0,
                f"magicguard a must be a positive number (got {self.a})")
        require(isinstance(self.w, (int, float)) and math.isfinite(self.w) and self.w > 0,
                f"magicguard w must be a positive number (got {self.w})")
        require(self.a <= 1.0, f"magicguard a must be at most 1 (got {self.a}); the guard's change must stay small")
        require(0.0 < self.ratio <= 1.0, f"magicguard ratio must lie in (0, 1] (got {self.ratio})")
        require(0 <= self.seed < 2**31, f"magicguard seed must lie in [0, 2^31) (got {self.seed})")
        require(self.variant in VARIANTS, f"magicguard variant must be one of {', '.join(VARIANTS)} (got {self.variant!r})")
        require(isinstance(self.site, str) and self.site != "", "magicguard site must be 'logits' or a layer name")


class MagicGuard(nn.Module):
    """The obfuscated activation.  No trainable parameters; a, w and the mask are buffers (saved with the weights)."""

    def __init__(self, a: float, w: float, mask: torch.Tensor | None = None, variant: str = "sine"):
        super().__init__()
        if variant not in VARIANTS:
            raise BadInput(f"unknown MagicGuard variant {variant!r}; use one of {', '.join(VARIANTS)}")
        self.register_buffer("amplitude", torch.tensor(float(a)))
        self.register_buffer("frequency", torch.tensor(float(w)))
        self.register_buffer("mask", mask.float() if mask is not None else torch.ones(0))
        self.variant = variant
        self.owner_mode = False  # plain attribute, never saved

    def ripple(self, x: torch.Tensor) -> torch.Tensor:
        """``y - x`` in FP32: bounded by ``a`` in magnitude."""
        xf = x if x.dtype == torch.float32 else x.float()
        a = self.amplitude
        if self.variant == "sine":
            r = a * torch.sin(self.frequency * xf)
        elif self.variant == "staircase":
            r = a * torch.floor(xf / a) - xf
        else:  # reversal: 2*stair(x) - x with step a/2, i.e. x + 2*(stair(x) - x)
            h = a / 2
            r = 2.0 * (h * torch.floor(xf / h) - xf)
        if self.mask.numel():
            r = r * self.mask.view([1, -1] + [1] * (x.dim() - 2))
        return r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.ripple(x)
        if self.owner_mode:
            r = r.detach()  # straight-through: forward identical, gradient exactly 1
        return x + (r if r.dtype == x.dtype else r.to(x.dtype))

    def extra_repr(self) -> str:
        masked = f", units {int(self.mask.sum())}/{self.mask.numel()}" if self.mask.numel() else ""
        return f"variant={self.variant}, a={float(self.amplitude):g}, w={float(self.frequency):g}{masked}"


class GuardedSite(nn.Sequential):
    """A hidden layer followed by its guard: ``Sequential(layer, guard)`` (state-dict keys ``site.0.*``, ``site.1.*``)."""

    def __init__(self, layer: nn.Module, guard: MagicGuard):
        super().__init__(layer, guard)


# --- insertion ------------------------------------------------------------------------------------------


def _site_module(model: nn.Module, site: str) -> nn.Module:
    modules = dict(model.named_modules())
    if site not in modules or site == "":
        names = [n for n, m in model.named_modules() if n and not list(m.children())]
        raise BadInput(f"magicguard site {site!r} is not a layer of this model; use 'logits' or a layer such as "
                       f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
    classifier = getattr(model, "classifier", None)
    module = modules[site]
    if classifier is not None and any(m is classifier for m in module.modules()):
        raise BadInput(f"magicguard site {site!r} produces (or contains) the logits; use site 'logits' for that")
    if isinstance(module, (MagicGuard, GuardedSite)) or any(isinstance(m, MagicGuard) for m in module.modules()):
        raise BadInput(f"magicguard site {site!r} is already guarded")
    return module


def _units(model: nn.Module, module: nn.Module | None, input_shape: Sequence[int]) -> int:
    """Size of the guarded axis (features or channels) from one forward pass on zeros."""
    out: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda m, i, o: out.setdefault("o", o)) if module is not None else None
    try:
        with torch.no_grad():
            z = model.eval()(torch.zeros(1, *input_shape))
    finally:
        if handle is not None:
            handle.remove()
    t = out.get("o", z) if module is not None else z
    if not isinstance(t, torch.Tensor) or t.dim() < 2:
        raise BadInput("the magicguard site must output a tensor with a feature or channel axis")
    return int(t.shape[1])


def _mask(cfg: MagicGuardConfig, units: int) -> torch.Tensor | None:
    if cfg.ratio >= 1.0:
        return None  # all units: no mask, and no useless Mul in the exported graph
    g = torch.Generator().manual_seed(cfg.seed)
    mask = torch.zeros(units)
    mask[torch.randperm(units, generator=g)[: max(1, round(cfg.ratio * units))]] = 1.0
    return mask


def attach(model: nn.Module, cfg: MagicGuardConfig, input_shape: Sequence[int]) -> nn.Module:
    """Insert the guard into an edgeguard model (in place; no weights are copied or changed) and return it."""
    if not hasattr(model, "guard"):
        raise BadInput("MagicGuard is inserted into edgeguard models (EdgeModel); this model has no guard slot")
    if guards(model):
        raise BadInput("this model already carries a MagicGuard; protect its unguarded parent instead")
    if cfg.site == LOGITS:
        model.guard = MagicGuard(cfg.a, cfg.w, _mask(cfg, _units(model, None, input_shape)), cfg.variant)
        return model
    layer = _site_module(model, cfg.site)
    guard = MagicGuard(cfg.a, cfg.w, _mask(cfg, _units(model, layer, input_shape)), cfg.variant)
    _replace(model, cfg.site, GuardedSite(layer, guard))
    return model


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if child.isdigit() and isinstance(parent, (nn.Sequential, nn.ModuleList)):
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def guards(model: nn.Module) -> list[MagicGuard]:
    return [m for m in model.modules() if isinstance(m, MagicGuard)]


def guard_paths(model: nn.Module) -> tuple[str, ...]:
    """Module paths of every guard (what quantization leaves in float)."""
    return tuple(n for n, m in model.named_modules() if isinstance(m, MagicGuard))


@contextlib.contextmanager
def owner_gradients(model: nn.Module) -> Iterator[nn.Module]:
    """Owner mode for every guard in ``model`` (straight-through gradients), restored on exit.

    Every gradient step edgeguard itself takes on a guarded model (QAT, watermark embedding, trigger search)
    runs inside this context.
    """
    found = guards(model)
    before = [g.owner_mode for g in found]
    for g in found:
        g.owner_mode = True
    try:
        yield model
    finally:
        for g, b in zip(found, before, strict=True):
            g.owner_mode = b


def strip(model: nn.Module) -> nn.Module:
    """Remove every guard in place (the owner's internal use; also an informed attacker's first step)."""
    if getattr(model, "guard", None) is not None:
        model.guard = None
    for name, m in list(model.named_modules()):
        if isinstance(m, GuardedSite):
            _replace(model, name, m[0])
    return model


# --- exported graphs ------------------------------------------------------------------------------------

GUARD_OPS = {"sine": "Sin", "staircase": "Floor", "reversal": "Floor"}
QDQ = ("QuantizeLinear", "DequantizeLinear")


def guard_nodes(proto, *, skip_prefix: str = "defense/") -> list[list[str]]:
    """The guard subgraphs of an exported ONNX graph: for every ``Sin`` (or ``Floor``) whose input is a product or
    quotient of a guarded tensor ``x``, the nodes from that first ``Mul``/``Div`` to the ``Add`` that returns
    ``x + ripple``.  Node names, for FP32 pinning in TensorRT and for checking that no Q/DQ sits inside.  Nodes of a
    grafted defense head (``skip_prefix``) are not searched."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found = []
    for core in (n for n in proto.graph.node if n.op_type in ("Sin", "Floor") and not n.name.startswith(skip_prefix)):
        first = producer.get(core.input[0])
        if first is None or first.op_type not in ("Mul", "Div"):
            continue
        x_names = set(first.input)
        chain, frontier, seen = [first, core], [core], {first.name, core.name}
        add = None
        while frontier and add is None and len(chain) < 16:  # walk forward to the Add that takes x back in
            nxt = []
            for n in frontier:
                for c in consumers.get(n.output[0], []):
                    if c.name in seen:
                        continue
                    seen.add(c.name)
                    chain.append(c)
                    if c.op_type == "Add" and x_names & set(c.input):
                        add = c
                        break
                    nxt.append(c)
                if add is not None:
                    break
            frontier = nxt
        if add is None:
            continue
        # keep only the nodes on a path between the first node and the Add (drop side consumers)
        back, keep = [add], {add.name}
        members = {n.name: n for n in chain}
        while back:
            n = back.pop()
            for i in n.input:
                p = producer.get(i)
                if p is not None and p.name in members and p.name not in keep:
                    keep.add(p.name)
                    back.append(p)
        found.append([n.name for n in proto.graph.node if n.name in keep])
    return found


def check_guard_graph(proto, expected: int) -> list[list[str]]:
    """The exported graph must hold ``expected`` guard subgraphs with no Q/DQ between their first node and their
    ``Add``; returns their node names.  Raises :class:`CheckFailed` otherwise."""
    found = guard_nodes(proto)
    if len(found) != expected:
        raise CheckFailed(f"the exported graph holds {len(found)} MagicGuard subgraphs, expected {expected}; nothing was written")
    ops = {n.name: n.op_type for n in proto.graph.node}
    for names in found:
        bad = [n for n in names if ops[n] in QDQ]
        if bad:
            raise CheckFailed(f"quantization nodes sit inside the MagicGuard subgraph ({', '.join(bad[:3])}); the guard "
                              "must stay FP32. Nothing was written")
    return found


def export_record(manifest: dict[str, Any], proto) -> dict[str, Any] | None:
    """The ``magicguard`` entry of an exported graph's metadata (site and the nodes to pin to FP32), or None for a
    bundle without a guard.  ``a``, ``w`` and the seed are not written: they are the owner's."""
    cfg = manifest.get(MANIFEST_KEY)
    if not cfg:
        return None
    found = check_guard_graph(proto, 1)
    return {"site": cfg["site"], "variant": cfg.get("variant", "sine"), "precision": "fp32", "nodes": found[0]}


def parity_atol(manifest: dict[str, Any], atol: float) -> float:
    """Parity tolerance for outputs of a guarded model: runtimes compute ``sin`` of large arguments differently, by up
    to the guard's full swing, so ``2a`` is added (docs/magicguard.md); unguarded models keep ``atol``."""
    cfg = manifest.get(MANIFEST_KEY)
    return atol + 2.0 * float(cfg["a"]) if cfg else atol
