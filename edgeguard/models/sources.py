"""Where an imported network comes from: a user's factory (``package.module:fn`` or ``path/to/file.py:fn``,
re-hashed on every rebuild) or a ``torch.export`` program (opened without unpickling anything).  The wrapper that
makes either an edgeguard model: :mod:`edgeguard.models.imported`."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import json
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeguard.errors import BadInput

ARCH = "imported"
PROGRAM_FILE = "program.pt2"
HEAD_NAMES = ("classifier", "fc", "head", "heads")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
_PREFIXES = ("module.", "model.", "_orig_mod.")




def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parse_target(target: str) -> tuple[str, str]:
    """``pkg.mod:fn`` or ``path/file.py:fn`` -> (module or file, function name)."""
    where, sep, fn = target.rpartition(":")
    if not sep or not where or not fn.isidentifier():
        raise BadInput(f"{target!r} is not a model source: give package.module:factory, path/to/file.py:factory "
                       "or an ExportedProgram file ending in .pt2")
    return where, fn


def factory_record(target: str, args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest record of a factory source: target, arguments, and the defining file with its sha256."""
    where, fn = parse_target(target)
    if where.endswith(".py"):
        f = Path(where).expanduser().resolve()
        if not f.is_file():
            raise BadInput(f"factory file {where} does not exist")
    else:
        try:
            mod = importlib.import_module(where)
        except Exception as e:
            raise BadInput(f"cannot import module {where!r} for the factory ({type(e).__name__}: {_first(e)})") from None
        if not getattr(mod, "__file__", None):
            raise BadInput(f"module {where!r} has no source file to record; put the factory in a .py file")
        f = Path(mod.__file__).resolve()
    return {"kind": "factory", "target": f"{where}:{fn}", "file": str(f), "sha256": _sha256(f),
            "args": dict(args or {})}


def _first(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _load_factory(rec: Mapping[str, Any]):
    where, fn = parse_target(str(rec["target"]))
    f = Path(str(rec["file"]))
    if not f.is_file():
        raise BadInput(f"rebuilding this imported model needs its factory file {f}, which is missing")
    if _sha256(f) != rec.get("sha256"):
        raise BadInput(f"factory file {f} changed since the model was imported (sha256 differs from the bundle's "
                       "record); restore it or import the model again")
    if where.endswith(".py"):
        name = f"edgeguard_user_{rec['sha256'][:16]}"
        mod = sys.modules.get(name)
        if mod is None:
            spec = importlib.util.spec_from_file_location(name, f)
            if spec is None or spec.loader is None:
                raise BadInput(f"cannot load {f} as a Python module")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            try:
                spec.loader.exec_module(mod)
            except Exception as e:
                del sys.modules[name]
                raise BadInput(f"importing factory file {f} failed ({type(e).__name__}: {_first(e)})") from None
    else:
        mod = importlib.import_module(where)
    factory = getattr(mod, fn, None)
    if not callable(factory):
        raise BadInput(f"{where} has no callable {fn!r}")
    return factory


def call_factory(rec: Mapping[str, Any]) -> nn.Module:
    factory = _load_factory(rec)
    try:
        module = factory(**dict(rec.get("args") or {}))
    except Exception as e:
        raise BadInput(f"factory {rec['target']} raised {type(e).__name__}: {_first(e)}") from None
    if not isinstance(module, nn.Module):
        raise BadInput(f"factory {rec['target']} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def _check_archive(data: bytes, name: str) -> None:
    """Refuse every part of a ``.pt2`` archive that ``torch.export.load`` would unpickle."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = zf.namelist()
    except zipfile.BadZipFile:
        raise BadInput(f"{name} is not a torch.export archive (not a zip file)") from None
    if not any(n.endswith("models/model.json") for n in names):
        raise BadInput(f"{name} is not a torch.export archive (no models/model.json; torch.save of a whole model "
                       "is refused: it is a pickle)")
    for n in names:
        parts = n.split("/")
        if "aotinductor" in parts:
            raise BadInput(f"{name} holds an AOTInductor package; edgeguard takes the portable ExportedProgram")
        if n.endswith("_config.json") and ("weights" in parts or "constants" in parts):
            cfg = json.loads(zf.read(n))
            for key, entry in (cfg.get("config") or {}).items():
                if entry.get("use_pickle"):
                    raise BadInput(f"{name} stores {key!r} as a pickle; refusing it (re-export with a current "
                                   "torch so tensors are stored raw)")
                if "constants" in parts and not str(entry.get("path_name", "")).startswith("tensor_"):
                    raise BadInput(f"{name} holds a custom object constant {key!r}, which loads by unpickling; "
                                   "refusing it")
        if ("weights" in parts or "constants" in parts) and n.endswith(".pt"):
            raise BadInput(f"{name} uses the legacy pickled weight format ({n}); refusing it")
        if "sample_inputs" in parts and n.endswith(".pt"):
            try:
                torch.load(io.BytesIO(zf.read(n)), map_location="cpu", weights_only=True)
            except Exception:
                raise BadInput(f"{name}'s sample inputs are not plain tensors; refusing it") from None


def promote_linears(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Turn every ``aten.linear(x, <attr>.weight, <attr>.bias)`` of an exported graph into a call of a real
    ``nn.Linear`` holding those same parameters, so hooks, head resets and surrogates see it as a layer.
    State-dict keys do not change."""
    graph = gm.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        x, w, *rest = node.args
        b = rest[0] if rest else None
        if not (getattr(w, "op", None) == "get_attr" and str(w.target).endswith(".weight")):
            continue
        owner = str(w.target)[: -len(".weight")]
        if b is not None and not (getattr(b, "op", None) == "get_attr" and b.target == f"{owner}.bias"):
            continue
        old = gm.get_submodule(owner)
        weight = old.weight
        if isinstance(old, nn.Linear) or weight.dim() != 2:
            continue
        bias = getattr(old, "bias", None) if b is not None else None
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        lin.weight = weight
        if bias is not None:
            lin.bias = bias
        parent, _, leaf = owner.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, lin)
        with graph.inserting_before(node):
            call = graph.call_module(owner, (x,))
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        changed = True
    if changed:
        for node in list(graph.nodes):
            if node.op == "get_attr" and not node.users:
                graph.erase_node(node)
        graph.lint()
        gm.recompile()
    return gm


def load_program(data: bytes, name: str = PROGRAM_FILE) -> nn.Module:
    """The module of an ExportedProgram archive, after :func:`_check_archive`; its linears promoted."""
    _check_archive(data, name)
    try:
        ep = torch.export.load(io.BytesIO(data))
    except Exception as e:
        raise BadInput(f"{name} is not a loadable torch.export program ({type(e).__name__}: {_first(e)})") from None
    try:
        gm = ep.module()
    except Exception as e:
        raise BadInput(f"{name}: the exported program has no runnable module ({type(e).__name__}: {_first(e)})") from None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise BadInput(f"{name} takes {len(placeholders)} inputs; an image classifier takes one N x C x H x W tensor")
    val = placeholders[0].meta.get("val")
    if val is not None and isinstance(val.shape[0], int):
        raise BadInput(f"{name} was exported for a fixed batch of {val.shape[0]}; export it again with "
                       "dynamic_shapes={'x': {0: torch.export.Dim('batch')}} so it takes any batch")
    return promote_linears(gm)


def program_input_shape(module: nn.Module) -> tuple[int, ...] | None:
    """(C, H, W) of an exported program's input when its spatial dims are static, else None."""
    for n in getattr(module, "graph", torch.fx.Graph()).nodes:
        if n.op == "placeholder" and n.meta.get("val") is not None:
            dims = tuple(n.meta["val"].shape[1:])
            return tuple(int(d) for d in dims) if all(isinstance(d, int) for d in dims) else None
    return None
