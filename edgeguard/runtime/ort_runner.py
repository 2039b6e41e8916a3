"""Runner for a ``.onnx`` file through ONNX Runtime (CPU by default; CUDA / TensorRT providers on request)."""

from __future__ import annotations

import numpy as np

from edgeguard.errors import BackendUnavailable, BadInput, OutputContractError
from edgeguard.fileio import sha256_file
from edgeguard.runtime.base import DefenseRecord, Runner, RunnerInfo
from edgeguard.runtime.graph import clean_view, contract_violation, probe_outputs
from edgeguard.runtime.metadata import decode

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def resolve_providers(providers) -> list[str]:
    import onnxruntime as ort

    names = list(providers or ["cpu"])
    available = ort.get_available_providers()
    out = []
    for p in names:
        full = PROVIDERS.get(p.lower(), p)
        if full not in available:
            raise BackendUnavailable(
                f"ONNX Runtime provider {p!r} is not available here (available: {', '.join(available)})"
            )
        out.append(full)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


class OrtRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, path, *, providers=None, threads: int | None = None, undefended: bool = False, **kw):
        super().__init__(path, **kw)
        self.providers = providers
        self.threads = threads
        self.undefended = undefended  # cut a fused defense head off: softmax(logits) of the same graph
        self.metadata: dict = {}

    def _open_impl(self) -> RunnerInfo:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime") from None
        if not self.path.is_file():
            raise BadInput(f"{self.path} does not exist")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
        providers = resolve_providers(self.providers)
        source = str(self.path)
        if self.undefended:
            source = self._clean_graph()
        try:
            self._session = ort.InferenceSession(source, sess_options=opts, providers=providers)
        except Exception as e:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadInput(f"{self.path} is not a valid ONNX model ({first[:200]})") from None
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise BadInput(f"{self.path} must have one N x C x H x W image input, found {[i.shape for i in inputs]}")
        self._input = inputs[0].name
        names = [o.name for o in outputs]
        flag = "defense_flag"  # edgeguard.export.heads.FLAG_OUTPUT (not imported: keeps this module torch-free)
        extra = [o for o in outputs[1:] if o.name != flag]
        if extra:
            raise BadInput(f"{self.path} has {len(outputs)} outputs ({', '.join(names)}); a classifier has one: "
                           f"(N, classes) scores")
        if len(outputs[0].shape or ()) != 2:
            raise BadInput(f"{self.path} outputs shape {outputs[0].shape}, not (N, classes): it is not a classifier")
        self._outputs = [names[0]] + ([flag] if flag in names else [])
        meta = decode(self._session.get_modelmeta().custom_metadata_map)
        self.metadata = meta
        shape = tuple(d if isinstance(d, int) else None for d in inputs[0].shape[1:])
        if "input_shape" in meta:
            shape = tuple(meta["input_shape"])
        out_dim = outputs[0].shape[-1] if outputs[0].shape else None
        classes = tuple(meta.get("classes") or [str(i) for i in range(out_dim if isinstance(out_dim, int) else 0)])
        if not classes:
            raise BadInput(f"{self.path} does not declare its number of classes (dynamic output and no metadata)")
        # An artifact without edgeguard metadata may output logits: decided once, on a probe batch, and said.
        self.outputs_detected = "probabilities"
        if meta.get("output", "") != "probabilities":
            self.outputs_detected, self.outputs_reason = self._probe(shape)
        self._softmax = self.outputs_detected == "logits"
        self._foreign = not meta
        record = DefenseRecord() if self.undefended else DefenseRecord.from_record(meta.get("defense"))
        return RunnerInfo(
            backend=self.backend,
            precision=meta.get("precision") or self._detect_precision(),
            defense=record.name,
            defense_record=record,
            input_shape=shape,
            classes=classes,
            sha256=sha256_file(self.path),
            path=str(self.path),
            device=self._session.get_providers()[0],
            details=(
                ("providers", tuple(self._session.get_providers())),
                ("source_sha256", meta.get("source_sha256")),
                ("edgeguard_version", meta.get("version")),
                ("softmax_added_by_runner", self._softmax),
                *((("outputs_detected", f"{self.outputs_detected}: {self.outputs_reason}"),) if not meta else ()),
            ),
        )

    def _graph(self):
        import onnx

        return onnx.load(str(self.path), load_external_data=False).graph

    def _clean_graph(self) -> bytes:
        import onnx


        try:
            proto = onnx.load(str(self.path), load_external_data=False)
        except Exception as e:
            raise BadInput(f"{self.path} is not a valid ONNX model ({type(e).__name__})") from None
        record = decode({p.key: p.value for p in proto.metadata_props}).get("defense") or {}
        if not isinstance(record, dict) or "logits" not in record:
            raise BadInput(f"{self.path} records no defense head, so it has no undefended view")
        return clean_view(proto, record["logits"]).SerializeToString()

    def _probe(self, shape) -> tuple[str, str]:
        """What a graph without edgeguard metadata returns, from 8 seeded [0, 1] images: (kind, why)."""
        if any(d is None for d in shape):
            return "logits", "C, H or W is dynamic, so no probe ran; a softmax is applied"
        batch = self._session.get_inputs()[0].shape[0]
        x = np.random.default_rng(0).random((batch if isinstance(batch, int) else 8, *shape), dtype=np.float32)
        try:
            y = self._session.run(self._outputs[:1], {self._input: x})[0]
        except Exception as e:  # ORT raises its own exception types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BadInput(f"{self.path} fails on a probe batch of {x.shape} images ({first[:200]})") from None
        if not np.isfinite(y).all():
            raise BadInput(f"{self.path} returns non-finite scores on a probe batch of [0, 1] images")
        return probe_outputs(y)

    def _detect_precision(self) -> str:
        ops = {n.op_type for n in self._graph().node}
        return "int8" if "QuantizeLinear" in ops or "DequantizeLinear" in ops else "fp32"

    def _predict_impl(self, x: np.ndarray) -> np.ndarray:
        outs = self._session.run(self._outputs, {self._input: x})
        out = outs[0]
        if len(outs) > 1:
            self.flagged += int(np.count_nonzero(outs[1]))
        if self._foreign:  # a graph edgeguard did not make: its answers are held to the output contract
            bad = contract_violation(out, probabilities=not self._softmax)
            if bad:
                raise OutputContractError(
                    f"{self.path} broke the output contract: {bad}; it was probed as returning {self.outputs_detected}"
                    + (" (every probe row was a distribution), so every answer must be one" if not self._softmax else ""))
        if self._softmax:
            z = out - out.max(axis=1, keepdims=True)
            e = np.exp(z)
            out = e / e.sum(axis=1, keepdims=True)
        return out

    def _close_impl(self) -> None:
        self._session = None


