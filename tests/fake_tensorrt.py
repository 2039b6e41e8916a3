"""A fake ``tensorrt`` module (10.x or 11.x flavour) and a fake cuda-python runtime, for tests without a GPU.

It records what the build code asks of TensorRT (network flags, builder flags, layer precisions, profile, timing
cache) and refuses what the real version would not have: on the 11.x flavour the removed ``BuilderFlag`` members
(FP16, INT8, OBEY/PREFER_PRECISION_CONSTRAINTS) do not exist, as in the 11.4 bindings.  The "plan" is a small JSON
naming the ONNX file; the fake engine runs it with ONNX Runtime on CPU through fake device memory (real host
addresses, copied with ctypes), so the runner's buffer handling, batch splitting and padding run for real.
Nothing here says anything about real TensorRT numerics.
"""

from __future__ import annotations

import ctypes
import json
import types

import numpy as np

PLAN_MAGIC = b"FAKEPLAN\n"


class _Enum:
    def __init__(self, **members):
        for k, v in members.items():
            setattr(self, k, v)


def make_tensorrt(version: str = "10.3.0.26"):
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    calls: dict = {"create_network": [], "flags": set(), "profiles": [], "deserialize": 0, "parsed": [],
                   "workspace": None, "opt_level": None}
    trt.calls = calls

    dt = _Enum(FLOAT="FLOAT", HALF="HALF", INT8="INT8", INT32="INT32", INT64="INT64", BOOL="BOOL", BF16="BF16")
    trt.DataType = dt
    trt.float32 = dt.FLOAT
    np_types = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
                "BOOL": np.bool_}
    trt.nptype = lambda d: np_types[d]
    flags = {"TF32": 10, "VERSION_COMPATIBLE": 11, "DEBUG": 12, "GPU_FALLBACK": 13}
    if major < 11:
        flags.update(FP16=1, INT8=2, OBEY_PRECISION_CONSTRAINTS=3, PREFER_PRECISION_CONSTRAINTS=4)
    trt.BuilderFlag = _Enum(**flags)
    trt.NetworkDefinitionCreationFlag = _Enum(STRONGLY_TYPED=1)  # deprecated (ignored) in 11.x, still present
    trt.MemoryPoolType = _Enum(WORKSPACE="WORKSPACE")
    trt.TensorIOMode = _Enum(INPUT="INPUT", OUTPUT="OUTPUT")

    class Logger:
        WARNING = 2

        def __init__(self, severity=2):
            self.severity = severity

    class Tensor:
        def __init__(self, name, dtype):
            self.name, self.dtype = name, dtype

    class Layer:
        def __init__(self, i, node):
            self.name = f"(Unnamed Layer* {i}) [{node.op_type}]"  # the parser's naming when a node makes helpers
            self.metadata = f"[ONNX Layer: {node.name}]"
            out_dt = dt.INT64 if node.op_type in ("ArgMax", "Shape", "TopK") else dt.FLOAT
            self._outputs = [Tensor(o, out_dt) for o in node.output]
            self.precision = None
            self.output_types = {}

        @property
        def num_outputs(self):
            return len(self._outputs)

        def get_output(self, j):
            return self._outputs[j]

        def set_output_type(self, j, t):
            self.output_types[j] = t

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.layers = []

        @property
        def num_layers(self):
            return len(self.layers)

        def get_layer(self, i):
            return self.layers[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.errors = []

        def parse_from_file(self, path):
            import onnx

            proto = onnx.load(path, load_external_data=False)
            self.network.layers = [Layer(i, n) for i, n in enumerate(proto.graph.node)]
            self.network.onnx_path = path
            calls["parsed"].append(path)
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+" if self.data else b"CACHE"

    class BuilderConfig:
        def __init__(self):
            self.flags = {v for k, v in flags.items() if k == "TF32"}  # TF32 is on by default
            self.builder_optimization_level = 3
            self.cache = None
            self.profiles = []

        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = size

        def set_flag(self, flag):
            if flag is None:
                raise TypeError("set_flag(): incompatible function arguments")
            self.flags.add(flag)
            calls["flags"].add(next(k for k, v in flags.items() if v == flag))

        def get_flag(self, flag):
            return flag in self.flags

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache.data.startswith(b"OTHERGPU"):
                return False
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            calls["profiles"].append(profile.shapes)
            return 0

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            calls["create_network"].append(flags)
            return Network(flags)

        def create_builder_config(self):
            return BuilderConfig()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls["opt_level"] = config.builder_optimization_level
            calls["pinned"] = {lay.metadata: (lay.precision, dict(lay.output_types),
                                              any(t.dtype == dt.FLOAT for t in lay._outputs)) for lay in network.layers}
            (name, shapes), = config.profiles[0].shapes.items()
            body = {"onnx": network.onnx_path, "input": name, "profile": [list(s) for s in shapes]}
            return PLAN_MAGIC + json.dumps(body).encode()

    class Context:
        def __init__(self, engine):
            self.engine = engine
            self.shapes = {}
            self.addresses = {}

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.profile
            if not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
                raise RuntimeError(f"shape {shape} outside the profile {lo}..{hi}")
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            if name == self.engine.input:
                return self.shapes[name]
            return (self.shapes[self.engine.input][0], *self.engine.out_shapes[name][1:])

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = int(ptr)
            return True

        def execute_async_v3(self, stream):
            e = self.engine
            shape = self.shapes[e.input]
            x = _view(self.addresses[e.input], shape, np.float32).copy()
            outs = e.session.run(e.outputs, {e.input: x})
            for name, arr in zip(e.outputs, outs, strict=True):
                arr = np.ascontiguousarray(arr, dtype=trt.nptype(e.dtypes[name]))
                ctypes.memmove(self.addresses[name], arr.ctypes.data, arr.nbytes)
            return True

    class Engine:
        def __init__(self, body):
            import onnxruntime as ort

            self.session = ort.InferenceSession(body["onnx"], providers=["CPUExecutionProvider"])
            self.input = body["input"]
            self.profile = [tuple(s) for s in body["profile"]]
            self.outputs = [o.name for o in self.session.get_outputs()]
            self.out_shapes = {o.name: [-1 if not isinstance(d, int) else d for d in o.shape]
                               for o in self.session.get_outputs()}
            self.dtypes = {self.input: dt.FLOAT}
            for o in self.session.get_outputs():
                self.dtypes[o.name] = dt.BOOL if "bool" in o.type else dt.FLOAT

        @property
        def num_io_tensors(self):
            return 1 + len(self.outputs)

        def get_tensor_name(self, i):
            return ([self.input] + self.outputs)[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == self.input else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return self.dtypes[name]

        def get_tensor_profile_shape(self, name, profile_index):
            return self.profile

        def get_tensor_shape(self, name):
            return tuple(self.out_shapes[name]) if name != self.input else (-1, *self.profile[0][1:])

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            calls["deserialize"] += 1
            data = bytes(data)
            if not data.startswith(PLAN_MAGIC):
                return None
            return Engine(json.loads(data[len(PLAN_MAGIC):]))

    for obj in (Logger, Builder, OnnxParser, Runtime):
        setattr(trt, obj.__name__, obj)
    return trt


def _view(ptr: int, shape, dtype) -> np.ndarray:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = (ctypes.c_uint8 * n).from_address(ptr)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def make_cudart(*, devices: int = 1, name: str = "Fake Orin", cc: tuple[int, int] = (8, 7)):
    """cuda-python's runtime API as the runner uses it; device memory is host memory kept alive here."""
    rt = types.ModuleType("cudart")
    rt.memory = {}
    rt.cudaMemcpyKind = _Enum(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def get_count():
        return 0, devices

    def get_props(i):
        if i >= devices:
            return 101, None
        return 0, types.SimpleNamespace(name=name.encode(), major=cc[0], minor=cc[1])

    def malloc(n):
        buf = np.zeros(int(n), np.uint8)
        rt.memory[buf.ctypes.data] = buf
        return 0, buf.ctypes.data

    def free(ptr):
        rt.memory.pop(int(ptr), None)
        return (0,)

    def memcpy(dst, src, n, kind, stream):
        ctypes.memmove(int(dst), int(src), int(n))
        return (0,)

    rt.cudaGetDeviceCount = get_count
    rt.cudaGetDeviceProperties = get_props
    rt.cudaMalloc = malloc
    rt.cudaFree = free
    rt.cudaMemcpyAsync = memcpy
    rt.cudaStreamCreate = lambda: (0, 7)
    rt.cudaStreamSynchronize = lambda s: (0,)
    rt.cudaStreamDestroy = lambda s: (0,)
    rt.cudaRuntimeGetVersion = lambda: (0, 12060)
    return rt
