"""Models edgeguard did not train: a user's factory (plus a state dict) or a ``torch.export`` program.

An imported model becomes an :class:`~edgeguard.models.base.EdgeModel` like every registry model --
``Normalize`` first (raw images in [0, 1]), then :class:`ImportedNet` around the user's module -- so the one
training loop, MagicGuard, quantization, export and the attacks work on it unchanged.  What they need from a
model (the final linear layer) is *discovered* here (:func:`find_head`) rather than required by a base class.

Rebuilding never trusts a pickle:

* ``factory``: the bundle records ``package.module:fn`` or ``path/to/file.py:fn``, its keyword arguments and
  the sha256 of the file that defines it; a rebuild re-hashes that file and refuses a changed one.
* ``program``: the ExportedProgram is stored in the bundle (``program.pt2``, hashed like ``model.pt``) and opened
  by :func:`load_program`, which refuses any archive entry ``torch.export.load`` would unpickle.

Weights always come from ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeguard.errors import BadInput
from edgeguard.models.base import EdgeModel
from edgeguard.models.sources import (
    _PREFIXES,
    _WRAPPER_KEYS,
    HEAD_NAMES,
    _first,
    call_factory,
    load_program,
)

# --- weights ---------------------------------------------------------------------------------------------


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.pt``/``.pth`` (``weights_only=True``) or ``.safetensors``; common wrappers unwrapped."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"weights file {p} does not exist")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load as st_load
        except ImportError:
            raise BadInput("reading .safetensors needs the safetensors package (pip install safetensors)") from None
        try:
            sd: Any = st_load(p.read_bytes())
        except Exception as e:
            raise BadInput(f"{p} is not a readable safetensors file ({type(e).__name__})") from None
    else:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            msg = str(e)
            if "weights_only" in msg or "Unsupported global" in msg or "GLOBAL" in msg:
                raise BadInput(f"{p} is a pickled Python object (a whole model), not a state dict; edgeguard never "
                               "unpickles a user's file: save model.state_dict() instead and pass the factory") from None
            raise BadInput(f"{p} is not a readable PyTorch file ({type(e).__name__})") from None
    for _ in range(2):  # {"state_dict": {...}}, {"model": {"state_dict": ...}}
        if isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
            inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
            if inner is None:
                break
            sd = inner
    if not isinstance(sd, Mapping) or not sd:
        raise BadInput(f"{p} holds no state dict of named tensors")
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise BadInput(f"{p} holds no state dict of named tensors")
    return tensors


def _strip(sd: dict[str, torch.Tensor], want: set[str]) -> tuple[dict[str, torch.Tensor], str | None]:
    """Drop a DataParallel / wrapper key prefix when it makes the keys fit ``want``."""
    if set(sd) & want:
        return sd, None
    for pre in _PREFIXES:
        if all(k.startswith(pre) for k in sd):
            stripped = {k[len(pre):]: v for k, v in sd.items()}
            if set(stripped) & want:
                return stripped, pre
    return sd, None


def fit_weights(module: nn.Module, sd: dict[str, torch.Tensor], source: str) -> str:
    """Load ``sd`` into ``module`` strictly; a mismatch is refused with counts and three examples of each kind.
    Returns a one-line report."""
    want = module.state_dict()
    sd, stripped = _strip(dict(sd), set(want))
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shaped = [k for k in want if k in sd and tuple(want[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or shaped:
        parts = [f"{len(v)} {what} ({', '.join(map(repr, v[:3]))}{', ...' if len(v) > 3 else ''})"
                 for v, what in ((missing, "missing"), (unexpected, "unexpected"), (shaped, "of another shape")) if v]
        raise BadInput(f"{source} does not fit the model: {'; '.join(parts)} of {len(want)} tensors; "
                       "is it the state dict of another architecture?")
    with torch.no_grad():
        module.load_state_dict({k: sd[k].to(want[k].dtype) for k in want}, strict=True)
    return f"loaded {len(want)} tensors from {source}" + (f" (key prefix {stripped!r} removed)" if stripped else "") + \
        "; 0 missing, 0 unexpected"


# --- the head ----------------------------------------------------------------------------------------------


def is_linear(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return isinstance(m, nn.Linear) or (isinstance(w, torch.Tensor) and w.dim() == 2 and not list(m.children())
                                        and not isinstance(m, nn.Embedding))


def _last_linear(m: nn.Module, prefix: str) -> str | None:
    if is_linear(m):
        return prefix
    found = None
    for name, sub in m.named_modules(prefix=prefix):
        if name != prefix and is_linear(sub):
            found = name
    return found


def out_features(m: nn.Module) -> int:
    return int(m.weight.shape[0])


def find_head(module: nn.Module, num_classes: int, hint: str | None = None) -> str:
    """Dotted path of the final linear layer inside ``module``.

    ``hint`` (``--head``) names it; else ``classifier``, ``fc``, ``head``, ``heads`` (a linear, or the last linear
    inside), a trailing ``Sequential``'s last linear, then the last linear whose ``out_features`` is the class count.
    """
    if hint:
        try:
            m = module.get_submodule(hint)
        except AttributeError:
            raise BadInput(f"--head {hint}: the model has no submodule of that name") from None
        path = _last_linear(m, hint)
        if path is None:
            raise BadInput(f"--head {hint} is a {type(m).__name__} with no linear layer in it")
        return _check_head(module, path, num_classes)
    misfit = None  # a conventionally named head of another size: the likelier explanation than "no head"
    for name in HEAD_NAMES:
        m = getattr(module, name, None)
        if isinstance(m, nn.Module):
            path = _last_linear(m, name)
            if path is not None and out_features(module.get_submodule(path)) == num_classes:
                return path
            if path is not None and misfit is None:
                misfit = path
    children = list(module.named_children())
    if isinstance(module, nn.Sequential) and children:
        path = _last_linear(children[-1][1], children[-1][0])
        if path is not None and out_features(module.get_submodule(path)) == num_classes:
            return path
    if children and isinstance(children[-1][1], nn.Sequential):
        path = _last_linear(children[-1][1], children[-1][0])
        if path is not None and out_features(module.get_submodule(path)) == num_classes:
            return path
    last = None
    for name, m in module.named_modules():
        if name and is_linear(m) and out_features(m) == num_classes:
            last = name
    if last is None and misfit is not None:
        return _check_head(module, misfit, num_classes)
    if last is None:
        raise BadInput(f"cannot find the final linear layer of this {type(module).__name__} (looked for .classifier, "
                       f".fc, .head, .heads, a trailing Sequential and any Linear with {num_classes} outputs); "
                       "name it with --head ATTR.PATH, e.g. --head classifier.3")
    return last


def _check_head(module: nn.Module, path: str, num_classes: int) -> str:
    n = out_features(module.get_submodule(path))
    if n != num_classes:
        raise BadInput(f"the head {path} has {n} outputs but the model has {num_classes} classes")
    return path


# --- the wrapper --------------------------------------------------------------------------------------------


class ImportedNet(nn.Module):
    """A user's module with the Backbone contract edgeguard uses: ``classifier`` (the discovered final linear),
    ``forward_features`` (its input, captured by a hook) and ``forward_head``."""

    def __init__(self, module: nn.Module, head: str, *, program: bool = False, head_is_last: bool = True,
                 outputs: str = "logits"):
        super().__init__()
        self.module = module
        self.head_path = head
        self.program = program
        self.head_is_last = head_is_last
        self.outputs = outputs  # "probabilities": the module ends in a softmax; its log is a logit vector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x)
        return torch.log(y.clamp_min(1e-30)) if self.outputs == "probabilities" else y

    @property
    def classifier(self) -> nn.Module:
        return self.module.get_submodule(self.head_path)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        seen: dict[str, torch.Tensor] = {}

        def grab(_m, args):
            seen["h"] = args[0]
            raise _Stop

        handle = self.classifier.register_forward_pre_hook(grab)
        try:
            self.module(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "h" not in seen:
            raise BadInput(f"the head {self.head_path} is not called by the model's forward; name another with --head")
        return seen["h"].flatten(1) if seen["h"].dim() > 2 else seen["h"]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        if not self.head_is_last:
            raise BadInput(f"the imported model's head {self.head_path} is not its last operation, so its features "
                           "cannot be fed to the head alone")
        return self.classifier(features)

    def train(self, mode: bool = True):
        if not self.program:
            return super().train(mode)
        for m in self.modules():  # an exported graph's modules refuse train(); their mode is fixed in the graph
            object.__setattr__(m, "training", mode)
        return self


class _Stop(Exception):
    pass


# --- probing a module at import ------------------------------------------------------------------------------


def probe(module: nn.Module, input_shape: Sequence[int], num_classes: int, head: str) -> dict[str, Any]:
    """Run the (normalised-input) module on a probe batch; refuse outputs that are not one row of ``num_classes``
    finite scores per image, not deterministic, or not independent of the other images in the batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, *input_shape, generator=g)
    seen: dict[str, torch.Tensor] = {}
    hm = module.get_submodule(head)

    def grab(_m, _i, o) -> None:  # a hook that returned a value would replace the head's output
        seen.setdefault("o", o)

    handle = hm.register_forward_hook(grab)
    try:
        with torch.no_grad():
            y = module(x)
            y2 = module(x)
            y1 = module(x[:1])
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"the model fails on a probe batch of shape {tuple(x.shape)} ({type(e).__name__}: {_first(e)}); "
                       "check --input-shape") from None
    finally:
        handle.remove()
    if not isinstance(y, torch.Tensor):
        raise BadInput(f"the model returns {type(y).__name__}, not one (N, classes) tensor of scores")
    if y.dim() != 2 or y.shape[0] != len(x):
        raise BadInput(f"the model outputs shape {tuple(y.shape)} for {len(x)} images, not (N, classes)")
    if y.shape[1] != num_classes:
        raise BadInput(f"the model outputs {y.shape[1]} scores per image but {num_classes} classes were given")
    if not torch.isfinite(y).all():
        raise BadInput("the model outputs non-finite scores on a probe batch")
    if not torch.allclose(y, y2, atol=1e-5, rtol=1e-4):
        raise BadInput("the model is not deterministic in eval mode (two runs on one batch differ)")
    if not torch.allclose(y[:1], y1, atol=1e-4, rtol=1e-3):
        raise BadInput("the model's output for an image depends on the other images in the batch in eval mode")
    head_out = seen.get("o")
    head_is_last = isinstance(head_out, torch.Tensor) and head_out.shape == y.shape and bool(
        torch.allclose(head_out, y, atol=1e-6))
    if head_out is None:
        raise BadInput(f"the head {head} is not called by the model's forward; name another with --head")
    looks_like = "probabilities" if bool((y >= 0).all() and (y.sum(1) - 1).abs().max() < 1e-4) else "logits"
    return {"head_is_last": head_is_last, "outputs": looks_like}


def build_imported(rec: Mapping[str, Any], *, num_classes: int, input_shape: Sequence[int], mean, std,
                   program: bytes | None = None) -> nn.Module:
    """The EdgeModel of an import record (``manifest["import"]``), freshly built (its weights come from model.pt)."""
    kind = rec.get("kind")
    if kind == "factory":
        module = call_factory(rec)
    elif kind == "program":
        if program is None:
            raise BadInput("this imported model's program.pt2 is missing")
        if hashlib.sha256(program).hexdigest() != rec.get("sha256"):
            raise BadInput("program.pt2 does not match the sha256 recorded at import")
        module = load_program(program)
    else:
        raise BadInput(f"unknown import kind {kind!r} in the manifest")
    head = str(rec.get("head") or "")
    try:
        hm = module.get_submodule(head)
    except AttributeError:
        raise BadInput(f"the rebuilt model has no head {head!r}; the factory no longer matches the bundle") from None
    if not is_linear(hm) or out_features(hm) != num_classes:
        raise BadInput(f"the rebuilt model's head {head!r} is not a linear layer with {num_classes} outputs")
    net = ImportedNet(module, head, program=kind == "program", head_is_last=bool(rec.get("head_is_last", True)),
                      outputs=str(rec.get("outputs", "logits")))
    if len(mean) != input_shape[0] or len(std) != input_shape[0]:
        raise BadInput(f"mean/std need {input_shape[0]} values, one per input channel")
    return EdgeModel(net, mean, std, head_path=f"net.module.{head}")
