"""Bundles: a model folder with ``manifest.json`` and ``model.pt`` (a plain state dict), plus the
owner's ``vault/`` of secrets.

manifest.json records the architecture and its options, classes, input shape, normalisation, the
stages applied (each a config dict), the sha256 and size of every file, and the edgeguard version.
``load_bundle`` re-hashes every file and refuses a bundle whose files do not match.  Bundles are
written atomically (built in a temp folder, then swapped in).  The vault travels with derived
bundles (it is the owner's) but is never copied into an exported ``.onnx`` or ``.engine``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgeguard import __version__
from edgeguard.config import DataConfig, config_from_dict
from edgeguard.errors import BadInput
from edgeguard.fileio import atomic_dir, atomic_write, atomic_write_json, sha256_file
from edgeguard.models import create_model
from edgeguard.models.guard import MagicGuardConfig, attach
from edgeguard.models.imported import build_imported
from edgeguard.models.sources import PROGRAM_FILE as PROGRAM

MANIFEST = "manifest.json"
WEIGHTS = "model.pt"
VAULT = "vault"
FORMAT = "edgeguard-bundle"
FORMAT_VERSION = 1
_REQUIRED = ("format", "arch", "num_classes", "classes", "input_shape", "normalization", "stages", "files")


def torch_bytes(obj) -> bytes:
    """``torch.save`` into memory: the archive's inner folder is then always ``archive/``, whereas saving to a path
    names it after the (temp) file, which made the same weights hash differently on every save."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def may_replace(path: str | Path) -> bool:
    """A bundle may be written over an earlier bundle or an empty folder, never over other content."""
    p = Path(path)
    return is_bundle(p) or (p.is_dir() and not any(p.iterdir()))


def check_target(out: str | Path) -> None:
    """Fail before any long work when ``out`` could not be written as a bundle."""
    p = Path(out)
    if p.exists() and not may_replace(p):
        raise BadInput(f"refusing to overwrite {p}: it exists and is not an edgeguard bundle (choose another --out)")


def stage_record(stage: str, config: Any = None, **info: Any) -> dict[str, Any]:
    """A manifest stage entry: the stage name, its config dict, and any results worth keeping."""
    rec: dict[str, Any] = {"stage": stage, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if config is not None:
        rec["config"] = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    rec.update(info)
    return rec


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a model from its state dict."""

    arch: str
    num_classes: int
    classes: tuple[str, ...]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    options: Mapping[str, Any]
    guard: Mapping[str, Any] | None = None  # MagicGuard config params (manifest "magicguard"), re-inserted on build
    source: Mapping[str, Any] | None = None  # an imported model's record (manifest "import"); None: the registry
    program_path: str | None = dataclasses.field(default=None, compare=False)  # where its program.pt2 lies now

    def program_bytes(self) -> bytes | None:
        if self.source is None or self.source.get("kind") != "program":
            return None
        if not self.program_path or not Path(self.program_path).is_file():
            raise BadInput(f"this imported model's {PROGRAM} is missing")
        return Path(self.program_path).read_bytes()

    def build(self) -> torch.nn.Module:
        if self.source is not None:
            model = build_imported(self.source, num_classes=self.num_classes, input_shape=self.input_shape,
                                   mean=self.mean, std=self.std, program=self.program_bytes())
        else:
            model = create_model(
                self.arch,
                num_classes=self.num_classes,
                in_channels=self.input_shape[0],
                mean=self.mean,
                std=self.std,
                **dict(self.options),
            )
        if self.guard:
            attach(model, MagicGuardConfig.from_mapping(self.guard, what="manifest magicguard"), self.input_shape)
        return model

    def with_guard(self, guard: Mapping[str, Any] | None) -> ModelSpec:
        return dataclasses.replace(self, guard=dict(guard) if guard else None)


class Bundle:
    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest

    @property
    def spec(self) -> ModelSpec:
        m = self.manifest
        return ModelSpec(
            arch=m["arch"],
            num_classes=int(m["num_classes"]),
            classes=tuple(m["classes"]),
            input_shape=tuple(m["input_shape"]),
            mean=tuple(m["normalization"]["mean"]),
            std=tuple(m["normalization"]["std"]),
            options=dict(m.get("model_options", {})),
            guard=dict(m["magicguard"]) if m.get("magicguard") else None,
            source=dict(m["import"]) if m.get("import") else None,
            program_path=str(self.path / PROGRAM) if (m.get("import") or {}).get("kind") == "program" else None,
        )

    @property
    def stages(self) -> list[dict[str, Any]]:
        return list(self.manifest["stages"])

    @property
    def sha256(self) -> str:
        """Hash of the manifest, which pins every file's hash: one id for the whole bundle."""
        return sha256_file(self.path / MANIFEST)

    @property
    def quantized(self) -> bool:
        """An INT8 bundle: its deployable form is the QDQ graph ``model.onnx``."""
        return self.manifest.get("precision", "fp32") != "fp32"

    @property
    def vault(self) -> Vault:
        return Vault(self.path / VAULT)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return _load_state_dict(self.path / WEIGHTS)

    def load_model(self, *, allow_quantized: bool = False) -> torch.nn.Module:
        """Rebuild the architecture and load the (float) weights; eval mode."""
        if self.quantized and not allow_quantized:
            raise BadInput(
                f"{self.path} is an INT8 bundle; protect, attack or fine-tune its float parent, then quantize again"
            )
        model = self.spec.build()
        sd = self.state_dict()
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError:
            want, have = model.state_dict(), sd
            missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
            shaped = sorted(k for k in set(want) & set(have) if tuple(want[k].shape) != tuple(getattr(have[k], "shape", ())))
            parts = [f"{len(v)} {what} (first {v[0]!r})" for v, what in
                     ((missing, "missing tensors"), (unexpected, "unexpected tensors"), (shaped, "tensors of another shape")) if v]
            raise BadInput(f"{self.path / WEIGHTS} does not fit architecture {self.spec.arch!r}: "
                           f"{'; '.join(parts) or 'the state dict does not load'}") from None
        norm = model.normalize
        if not (torch.allclose(norm.mean.flatten(), torch.tensor(self.spec.mean)) and torch.allclose(norm.std.flatten(), torch.tensor(self.spec.std))):
            raise BadInput(f"{self.path / MANIFEST}: normalization disagrees with {WEIGHTS}; the bundle was edited")
        return model.eval()


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError ...
        raise BadInput(f"{path} is not a plain PyTorch state dict ({type(e).__name__}); refusing to load it") from None
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise BadInput(f"{path} is not a state dict of named tensors; refusing to load it")
    return dict(sd)


def _validate_manifest(p: Path, m: dict[str, Any]) -> None:
    """Types and internal consistency; a manifest edited into nonsense is refused, not half-used."""

    def bad(what: str) -> BadInput:
        return BadInput(f"{p / MANIFEST} is malformed: {what}; the bundle is corrupted or was edited")

    fv = m.get("format_version", 1)
    if not isinstance(fv, int):
        raise bad("format_version is not an integer")
    if fv > FORMAT_VERSION:
        raise BadInput(f"{p} was written by a newer edgeguard (bundle format {fv})")
    if not isinstance(m["arch"], str) or not isinstance(m["num_classes"], int) or m["num_classes"] < 2:
        raise bad("arch must be a name and num_classes an integer >= 2")
    if not isinstance(m["classes"], list) or len(m["classes"]) != m["num_classes"] or not all(isinstance(c, str) for c in m["classes"]):
        raise bad(f"classes must list {m['num_classes']} names")
    shape = m["input_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise bad("input_shape must be [C, H, W]")
    norm = m["normalization"]
    if not (isinstance(norm, dict) and all(isinstance(norm.get(k), list) and len(norm[k]) == shape[0] for k in ("mean", "std"))):
        raise bad("normalization needs one mean and one std per input channel")
    if not isinstance(m["stages"], list) or not all(isinstance(s, dict) and isinstance(s.get("stage"), str) for s in m["stages"]):
        raise bad("stages must be a list of records with a 'stage' name")
    if m.get("magicguard") is not None and not isinstance(m["magicguard"], dict):
        raise bad("magicguard must be a mapping of the guard's settings")
    imp = m.get("import")
    if imp is not None and not (isinstance(imp, dict) and imp.get("kind") in ("factory", "program")
                                and isinstance(imp.get("head"), str) and isinstance(imp.get("sha256"), str)):
        raise bad("import must record its kind (factory or program), head and sha256")
    if isinstance(imp, dict) and imp.get("kind") == "program" and PROGRAM not in m["files"]:
        raise bad(f"an imported program bundle must list its {PROGRAM}")
    files = m["files"]
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise bad(f"files must list {WEIGHTS}")
    if m.get("precision", "fp32") != "fp32" and "model.onnx" not in files:
        raise bad("an INT8 bundle must list its model.onnx")
    for name in files:
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise bad(f"file name {name!r} points outside the bundle")


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Open a bundle folder; with ``verify`` every file listed in the manifest is re-hashed."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{p} does not exist")
    if not p.is_dir() or not (p / MANIFEST).is_file():
        raise BadInput(f"{p} is not an edgeguard bundle (no {MANIFEST} in it)")
    try:
        manifest = json.loads((p / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{p / MANIFEST} is not valid JSON ({e.__class__.__name__}); the bundle is corrupted") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadInput(f"{p / MANIFEST} is not an edgeguard bundle manifest")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise BadInput(f"{p / MANIFEST} lacks {', '.join(missing)}; the bundle is corrupted")
    _validate_manifest(p, manifest)
    if verify:
        for name, rec in manifest["files"].items():
            f = p / name
            if not f.is_file():
                raise BadInput(f"bundle {p} is missing {name}")
            if sha256_file(f) != rec.get("sha256"):
                raise BadInput(
                    f"bundle {p}: {name} does not match the sha256 recorded in its manifest "
                    "(the file was modified or corrupted); refusing to load it"
                )
    return Bundle(p, manifest)


def save_bundle(
    out: str | Path,
    model: torch.nn.Module,
    spec: ModelSpec,
    *,
    stages: Sequence[Mapping[str, Any]],
    dataset: str | None = None,
    parent: Bundle | None = None,
    extra: Mapping[str, Any] | None = None,
    keep_vault: bool = True,
    extra_files: Mapping[str, Any] | None = None,
) -> Bundle:
    """Write ``model``'s state dict and a manifest to ``out`` atomically.

    ``parent``: the bundle this one derives from; its hash is recorded and (``keep_vault``) its vault
    carried over.  An attacker's copy (removal attacks) is written with ``keep_vault=False``.
    ``extra_files``: name -> writer(path) for further files (e.g. a quantized bundle's ``model.onnx``);
    they are hashed into the manifest like ``model.pt``.
    """
    out = Path(out)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    check_target(out)
    program = spec.program_bytes()  # an imported program travels with every derived bundle
    extra_files = dict(extra_files or {})
    if program is not None:
        extra_files[PROGRAM] = lambda t: Path(t).write_bytes(program)
    with atomic_dir(out, may_replace=may_replace) as tmp:
        atomic_write(tmp / WEIGHTS, lambda t: t.write_bytes(torch_bytes(sd)))
        for name, writer in (extra_files or {}).items():
            atomic_write(tmp / name, writer)
        if keep_vault and parent is not None and (parent.path / VAULT).is_dir():
            shutil.copytree(parent.path / VAULT, tmp / VAULT)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "edgeguard_version": __version__,
            "torch_version": torch.__version__,
            "arch": spec.arch,
            "model_options": dict(spec.options),
            "num_classes": spec.num_classes,
            "classes": list(spec.classes),
            "input_shape": list(spec.input_shape),
            "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
            "dataset": dataset if dataset is not None else (parent.manifest.get("dataset") if parent else None),
            "parent_sha256": parent.sha256 if parent is not None else None,
            "stages": [dict(s) for s in stages],
            "files": {
                name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                for name in [WEIGHTS, *(extra_files or {})]
            },
        }
        if spec.guard:
            manifest["magicguard"] = dict(spec.guard)
        if spec.source is not None:
            manifest["import"] = dict(spec.source)
        if extra:
            manifest.update(extra)
        atomic_write_json(tmp / MANIFEST, manifest)
    return load_bundle(out)


class Vault:
    """The owner's secrets (trigger sets, keys, enrolments) beside a bundle: ``BUNDLE/vault/``.

    ``vault.json`` indexes every entry with its sha256; reading a modified entry is refused.
    """

    INDEX = "vault.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _index(self) -> dict[str, Any]:
        f = self.path / self.INDEX
        if not f.is_file():
            return {"format": "edgeguard-vault", "entries": {}}
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError:
            raise BadInput(f"{f} is not valid JSON; the vault is corrupted") from None

    def names(self) -> list[str]:
        return sorted(self._index()["entries"])

    def __contains__(self, name: str) -> bool:
        return name in self._index()["entries"]

    def _put(self, name: str, filename: str, kind: str, writer) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / filename, writer)
        index = self._index()
        index["entries"][name] = {"file": filename, "kind": kind, "sha256": sha256_file(self.path / filename)}
        atomic_write_json(self.path / self.INDEX, index)

    def _file(self, name: str, kind: str) -> Path:
        rec = self._index()["entries"].get(name)
        if rec is None or rec["kind"] != kind:
            raise BadInput(f"vault {self.path} has no {kind} entry {name!r}")
        f = self.path / rec["file"]
        if not f.is_file() or sha256_file(f) != rec["sha256"]:
            raise BadInput(f"vault entry {name!r} in {self.path} was modified or is missing; refusing to use it")
        return f

    def put_json(self, name: str, obj: Any) -> None:
        data = (json.dumps(obj, indent=2) + "\n").encode()
        self._put(name, f"{name}.json", "json", lambda t: Path(t).write_bytes(data))

    def get_json(self, name: str) -> Any:
        return json.loads(self._file(name, "json").read_text())

    def put_tensors(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        self._put(name, f"{name}.pt", "tensors", lambda t: t.write_bytes(torch_bytes(data)))

    def get_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return _load_state_dict(self._file(name, "tensors"))


def bundle_data_config(bundle: Bundle) -> DataConfig:
    """The dataset a bundle was trained on (its first ``train`` or ``import`` stage), else the default."""
    for st in bundle.stages:
        if st.get("stage") in ("train", "import") and st.get("data"):
            return config_from_dict(st["data"])  # type: ignore[return-value]
    return DataConfig()
