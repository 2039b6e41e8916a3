"""A fake ``tensorrt`` module (10.x or 11.x flavour) and a fake cuda-python runtime, for tests without a GPU.

It records what the build code asks of TensorRT (network flags, builder flags, layer precisions, profile, timing
cache) and refuses what the real version would not have: on the 11.x flavour the removed ``BuilderFlag`` members
(FP16, INT8, OBEY/PREFER_PRECISION_CONSTRAINTS) do not exist, as in the 11.4 bindings.  Its ONNX parser enforces
the documented rules the project relies on (docs/tensorrt.md, "What the fake enforces"), returning False with
errors as the real ``parse_from_file`` does: INT8 Q/DQ only, zero points 0 (symmetric), scales all positive, a
per-channel scale as long as its axis, opset >= 9 (<= 25 on 11.x).  Its network has no layer for a Constant node,
adds helper layers without ONNX metadata (a cast after TopK / ArgMax indices, a shuffle after Softmax), and types
outputs as TensorRT does (TopK values FLOAT and indices INT32, comparisons BOOL, Shape INT64).  The execution
context's ``set_input_shape`` returns False for a shape outside the profile, as the binding does.  The "plan" is a small JSON
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

    cast_types = {1: dt.FLOAT, 10: dt.HALF, 6: dt.INT32, 7: dt.INT64, 3: dt.INT8, 9: dt.BOOL}

    def out_types(node):
        op = node.op_type
        if op == "TopK":
            return [dt.FLOAT, dt.INT32]  # ITopKLayer: values, INT32 indices
        if op == "ArgMax":
            return [dt.INT32]
        if op in ("Greater", "Less", "Equal", "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN"):
            return [dt.BOOL]
        if op == "Shape":
            return [dt.INT64]
        if op == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), 1)
            return [cast_types.get(to, dt.FLOAT)]
        return [dt.FLOAT] * len(node.output)

    class Layer:
        def __init__(self, name, metadata, inputs, outputs):
            self.name, self.metadata = name, metadata
            self._inputs = [Tensor(n, None) for n in inputs]
            self._outputs = outputs
            self.precision = None
            self.output_types = {}

        @property
        def num_inputs(self):
            return len(self._inputs)

        def get_input(self, k):
            return self._inputs[k]

        @property
        def num_outputs(self):
            return len(self._outputs)

        def get_output(self, j):
            return self._outputs[j]

        def set_output_type(self, j, t):
            self.output_types[j] = t

    def layers_of(proto):
        """One layer per node except Constants (they become weights), plus the parser's helper layers."""
        consts = {i.name for i in proto.graph.initializer} | {o for n in proto.graph.node if n.op_type == "Constant"
                                                             for o in n.output}
        meta_of = calls.get("metadata_format", "[ONNX Layer: {}]")
        layers = []

        def add(kind, meta, inputs, outputs):
            layers.append(Layer(f"(Unnamed Layer* {len(layers)}) [{kind}]", meta,
                                [i for i in inputs if i and i not in consts], outputs))

        for node in proto.graph.node:
            if node.op_type == "Constant":
                continue
            types = out_types(node)
            meta = meta_of.format(node.name)
            if node.op_type == "Softmax":  # softmax over the last axis, then a shuffle the parser adds
                add("Softmax", meta, node.input, [Tensor(node.output[0] + "__pre", dt.FLOAT)])
                add("Shuffle", "", [node.output[0] + "__pre"], [Tensor(node.output[0], dt.FLOAT)])
            elif node.op_type in ("TopK", "ArgMax"):  # TensorRT's INT32 indices, cast to ONNX's INT64 by a helper
                idx = len(types) - 1
                outs = [Tensor(o if j != idx else o + "__i32", t) for j, (o, t) in enumerate(zip(node.output, types, strict=True))]
                add(node.op_type, meta, node.input, outs)
                add("Cast", "", [node.output[idx] + "__i32"], [Tensor(node.output[idx], dt.INT64)])
            else:
                add(node.op_type, meta, node.input, [Tensor(o, t) for o, t in zip(node.output, types, strict=True)])
        return layers

    def parser_errors(proto):
        """The documented rules of TensorRT's ONNX parser this project relies on (docs/tensorrt.md)."""
        from onnx import TensorProto, numpy_helper

        errs = []
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < 9 or (major >= 11 and opset > 25):
            errs.append(f"Unsupported ONNX opset {opset} (the parser supports opset 9 and above"
                        + (", up to 25)" if major >= 11 else ")"))
        inits = {i.name: i for i in proto.graph.initializer}
        for n in proto.graph.node:
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                continue
            scale = numpy_helper.to_array(inits[n.input[1]]) if n.input[1] in inits else None
            zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if zp is not None and zp.data_type != TensorProto.INT8:
                errs.append(f"{n.name}: {n.op_type} zero point of type {TensorProto.DataType.Name(zp.data_type)}; "
                            "only INT8 quantization is supported")
            elif zp is not None and numpy_helper.to_array(zp).any():
                errs.append(f"{n.name}: {n.op_type} zero point must be 0 (TensorRT quantization is symmetric)")
            if scale is not None and not (scale > 0).all():
                errs.append(f"{n.name}: Assertion failed: scaleAllPositive && \"Scale coefficients must all be positive\"")
            if scale is not None and scale.size > 1:
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                x = inits.get(n.input[0])
                if x is not None and (axis >= len(x.dims) or x.dims[axis] != scale.size):
                    errs.append(f"{n.name}: per-channel scale of {scale.size} values does not match axis {axis} of "
                                f"the input {list(x.dims)}")
        return errs

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
            calls["parsed"].append(path)
            self.errors = parser_errors(proto)
            if self.errors:
                return False  # the real parser returns False and keeps the errors (it does not raise)
            self.network.layers = layers_of(proto)
            self.network.onnx_path = path
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

        def clear_flag(self, flag):
            if flag is None:
                raise TypeError("clear_flag(): incompatible function arguments")
            self.flags.discard(flag)
            calls.setdefault("cleared", set()).add(next(k for k, v in flags.items() if v == flag))

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
            calls["pinned"] = {lay.name: (lay.metadata, lay.precision, dict(lay.output_types),
                                          any(t.dtype == dt.FLOAT for t in lay._outputs)) for lay in network.layers}
            calls["tf32_at_build"] = flags["TF32"] in config.flags
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
            calls.setdefault("shapes_set", []).append(tuple(shape))
            if tuple(shape) in calls.get("refuse_shapes", ()) or not all(
                    a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
                return False  # the binding reports a refused shape by its return value, not an exception
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

    rt.pinned = {}
    rt.copies = []  # (kind, stream, whether the host side is page-locked)

    def malloc(n):
        buf = np.zeros(int(n), np.uint8)
        rt.memory[buf.ctypes.data] = buf
        return 0, buf.ctypes.data

    def malloc_host(n):
        buf = np.zeros(int(n), np.uint8)
        rt.pinned[buf.ctypes.data] = buf
        return 0, buf.ctypes.data

    def free(ptr):
        rt.memory.pop(int(ptr), None)
        return (0,)

    def free_host(ptr):
        rt.pinned.pop(int(ptr), None)
        return (0,)

    def memcpy(dst, src, n, kind, stream):
        host = int(src) if kind == 1 else int(dst)
        rt.copies.append((kind, stream, any(p <= host < p + b.nbytes for p, b in rt.pinned.items())))
        ctypes.memmove(int(dst), int(src), int(n))
        return (0,)

    rt.cudaGetDeviceCount = get_count
    rt.cudaGetDeviceProperties = get_props
    rt.cudaMalloc = malloc
    rt.cudaFree = free
    rt.cudaMallocHost = malloc_host
    rt.cudaFreeHost = free_host
    rt.cudaMemcpyAsync = memcpy
    rt.cudaStreamCreate = lambda: (0, 7)
    rt.cudaStreamSynchronize = lambda s: (0,)
    rt.cudaStreamDestroy = lambda s: (0,)
    rt.cudaRuntimeGetVersion = lambda: (0, 12060)
    return rt
