"""Runner for a TensorRT ``.engine`` / ``.plan`` file built by ``edgeguard build-engine``.

Opening checks, in order: the file exists (exit 2); tensorrt imports and a CUDA GPU is visible (exit 3); the
manifest ``MODEL.engine.json`` is beside it, the engine's sha256 is the recorded one, and the TensorRT version and
compute capability match this machine (exit 2 with a rebuild hint, *before* ``deserialize_cuda_engine``).

Prediction: the input shape is set per call (``set_input_shape`` answers False, not an exception, for a shape the
profile refuses: checked) and a batch larger than the optimization profile's maximum is split (a batch below its
minimum is padded).  The runner works on its own CUDA stream with page-locked host buffers, as TensorRT's samples
do (the default stream synchronises with every other stream; pageable copies are staged and synchronous): torch
CUDA tensors and a ``torch.cuda.Stream`` when torch sees the GPU, else cuda-python allocations made once at the
profile's maximum batch (``cudaMalloc`` + ``cudaMallocHost``; the Jetson path: no torch wheel needed).  The output is
turned into probabilities as the ONNX runner does: an engine whose graph ends in logits gets a softmax.
"""

from __future__ import annotations

import numpy as np

from edgeguard.errors import BackendUnavailable, BadInput, CheckFailed
from edgeguard.fileio import sha256_file
from edgeguard.runtime import trt_env
from edgeguard.runtime.base import DefenseRecord, Runner, RunnerInfo

FLAG_OUTPUT = "defense_flag"  # edgeguard.export.heads.FLAG_OUTPUT


def plan_batches(n: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Split ``n`` rows into (start, stop, rows sent) for a profile with batch bounds ``lo``..``hi``: chunks of at
    most ``hi`` rows; a chunk below ``lo`` is padded up to ``lo`` rows."""
    if not 1 <= lo <= hi:
        raise BadInput(f"invalid batch profile {lo}..{hi}")
    out = []
    for s in range(0, n, hi):
        e = min(s + hi, n)
        out.append((s, e, max(e - s, lo)))
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _cuda_ok(err) -> None:
    if int(err) != 0:
        raise CheckFailed(f"a CUDA call failed (cudaError {int(err)})")


class TrtRunner(Runner):
    backend = "tensorrt"

    def __init__(self, path, **kw):
        super().__init__(path, **kw)
        self.manifest: dict = {}
        self._buffers: dict[str, int] = {}
        self._host: dict[str, int] = {}  # page-locked host buffers (cuda-python path)

    def _open_impl(self) -> RunnerInfo:
        if not self.path.is_file():
            raise BadInput(f"{self.path} does not exist")
        trt = trt_env.import_tensorrt(f"run {self.path}")
        env = trt_env.environment(trt)  # BackendUnavailable without a GPU
        m = trt_env.read_manifest(self.path)
        trt_env.check_compatible(m, env, engine=self.path)
        sha = sha256_file(self.path)
        if sha != m["engine_sha256"]:
            raise BadInput(f"{self.path} is not the engine its manifest records (sha256 differs: modified or replaced); "
                           + trt_env.REBUILD.format(engine=self.path))
        self.manifest = m
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise BadInput(f"TensorRT could not deserialize {self.path}; " + trt_env.REBUILD.format(engine=self.path))
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or not outputs:
            raise BadInput(f"{self.path} must have one image input and an output, found inputs {inputs}")
        self._input = inputs[0]
        order = [n for n in m.get("output_names", []) if n in outputs] or outputs
        self._output = order[0]
        self._outputs = [self._output] + ([FLAG_OUTPUT] if FLAG_OUTPUT in outputs and FLAG_OUTPUT != self._output else [])
        self._all_outputs = outputs
        lo, _, hi = (tuple(s) for s in self._engine.get_tensor_profile_shape(self._input, 0))
        self._lo, self._hi = int(lo[0]), int(hi[0])
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self._use_torch = self._torch_cuda()
        if self._use_torch:
            import torch

            self._torch_stream = torch.cuda.Stream()
        else:
            self._alloc_cuda_python(tuple(int(d) for d in hi))
        meta = m.get("metadata") or {}
        self._softmax = m.get("output", meta.get("output")) != "probabilities"
        shape = tuple(meta.get("input_shape") or m["profile"]["max"][1:])
        classes = tuple(meta.get("classes") or [])
        if not classes:
            n_out = self._engine.get_tensor_shape(self._output)[-1]
            if n_out < 1:
                raise BadInput(f"{self.path} does not declare its number of classes (dynamic output and no metadata)")
            classes = tuple(str(i) for i in range(n_out))
        record = DefenseRecord.from_record(meta.get("defense"))
        return RunnerInfo(
            backend=self.backend,
            precision=str(m.get("precision") or meta.get("precision") or "fp32"),
            defense=record.name,
            defense_record=record,
            input_shape=shape,  # type: ignore[arg-type]
            classes=classes,
            sha256=sha,
            path=str(self.path),
            device=env["gpu_name"],
            details=(
                ("tensorrt_version", env["tensorrt_version"]),
                ("compute_capability", env["compute_capability"]),
                ("profile", (self._lo, self._hi)),
                ("flags", tuple(sorted((k, v) for k, v in (m.get("flags") or {}).items()))),
                ("source_onnx_sha256", m.get("source_onnx_sha256")),
                ("edgeguard_version", m.get("edgeguard_version")),
                ("buffers", "torch" if self._use_torch else "cuda-python"),
                ("softmax_added_by_runner", self._softmax),
            ),
        )

    @staticmethod
    def _torch_cuda() -> bool:
        try:
            import torch
        except ImportError:
            return False
        return bool(torch.cuda.is_available())

    # --- cuda-python buffers (allocated once, at the profile's maximum batch) --------------------------
    def _alloc_cuda_python(self, max_in: tuple[int, ...]) -> None:
        try:
            cudart = trt_env._cudart()
        except ImportError:
            raise BackendUnavailable("running a TensorRT engine needs torch with CUDA or cuda-python "
                                     "(pip install 'edgeguard[trt]')") from None
        self._cudart = cudart
        ctx = self._context
        self._set_shape(max_in)
        err, self._stream = cudart.cudaStreamCreate()
        _cuda_ok(err)
        for name in [self._input, *self._all_outputs]:
            shape = max_in if name == self._input else tuple(ctx.get_tensor_shape(name))
            nbytes = max(int(np.prod(shape)) * self._dtypes[name].itemsize, 1)
            err, ptr = cudart.cudaMalloc(nbytes)
            _cuda_ok(err)
            self._buffers[name] = ptr
            err, host = cudart.cudaMallocHost(nbytes)
            _cuda_ok(err)
            self._host[name] = host
            if not ctx.set_tensor_address(name, int(ptr)):
                raise CheckFailed(f"TensorRT refused the device buffer of {name!r} for {self.path}")

    def _set_shape(self, shape: tuple[int, ...]) -> None:
        """``set_input_shape`` returns False (it does not raise) for a shape outside the profile."""
        if not self._context.set_input_shape(self._input, tuple(int(d) for d in shape)):
            raise BadInput(f"TensorRT refused the input shape {tuple(shape)} for {self.path} (its profile takes "
                           f"batches {self._lo}..{self._hi} of {tuple(self.manifest['profile']['max'][1:])})")

    def _run_cuda_python(self, x: np.ndarray) -> dict[str, np.ndarray]:
        import ctypes

        cudart, ctx = self._cudart, self._context
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        ctypes.memmove(self._host[self._input], x.ctypes.data, x.nbytes)  # into page-locked memory, then async
        _cuda_ok(cudart.cudaMemcpyAsync(self._buffers[self._input], self._host[self._input], x.nbytes, h2d,
                                        self._stream)[0])
        if not ctx.execute_async_v3(int(self._stream)):
            raise CheckFailed(f"TensorRT failed to run {self.path}")
        shapes = {name: tuple(ctx.get_tensor_shape(name)) for name in self._outputs}
        for name in self._outputs:
            nbytes = int(np.prod(shapes[name])) * self._dtypes[name].itemsize
            _cuda_ok(cudart.cudaMemcpyAsync(self._host[name], self._buffers[name], nbytes, d2h, self._stream)[0])
        _cuda_ok(cudart.cudaStreamSynchronize(self._stream)[0])
        outs = {}
        for name in self._outputs:
            arr = np.empty(shapes[name], dtype=self._dtypes[name])
            ctypes.memmove(arr.ctypes.data, self._host[name], arr.nbytes)
            outs[name] = arr
        return outs

    # --- torch CUDA tensors as buffers --------------------------------------------------------------------
    def _run_torch(self, x: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        ctx, stream = self._context, self._torch_stream
        with torch.cuda.stream(stream):  # the runner's own stream, page-locked host copies both ways
            inp = torch.from_numpy(x).pin_memory().to("cuda", non_blocking=True)
            ctx.set_tensor_address(self._input, inp.data_ptr())
            tensors = {}
            for name in self._all_outputs:
                dt = torch.from_numpy(np.empty(0, dtype=self._dtypes[name])).dtype
                tensors[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=dt, device="cuda")
                ctx.set_tensor_address(name, tensors[name].data_ptr())
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise CheckFailed(f"TensorRT failed to run {self.path}")
            host = {n: torch.empty(tensors[n].shape, dtype=tensors[n].dtype, pin_memory=True) for n in self._outputs}
            for n in self._outputs:
                host[n].copy_(tensors[n], non_blocking=True)
        stream.synchronize()
        return {n: host[n].numpy() for n in self._outputs}

    def _predict_impl(self, x: np.ndarray) -> np.ndarray:
        parts = []
        for s, e, rows in plan_batches(len(x), self._lo, self._hi):
            chunk = x[s:e]
            if rows > len(chunk):
                chunk = np.concatenate([chunk, np.zeros((rows - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            chunk = np.ascontiguousarray(chunk, dtype=self._dtypes[self._input])
            self._set_shape(chunk.shape)
            outs = self._run_torch(chunk) if self._use_torch else self._run_cuda_python(chunk)
            n = e - s
            if FLAG_OUTPUT in outs:
                self.flagged += int(np.count_nonzero(outs[FLAG_OUTPUT][:n]))
            parts.append(outs[self._output][:n].astype(np.float32))
        out = np.concatenate(parts) if parts else np.zeros((0, self.info.num_classes), np.float32)
        return softmax(out) if self._softmax else out

    def _close_impl(self) -> None:
        for ptr in self._buffers.values():
            self._cudart.cudaFree(ptr)
        for ptr in self._host.values():
            self._cudart.cudaFreeHost(ptr)
        self._buffers, self._host = {}, {}
        if getattr(self, "_stream", None) is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._context = self._engine = self._runtime = None
