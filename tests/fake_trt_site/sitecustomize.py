"""Put on PYTHONPATH to make every Python process see the fake tensorrt and cuda-python of tests/fake_tensorrt.py
(used to run deploy/gpu_check.py end to end on CPU: its steps are separate ``edgeguard`` processes)."""

import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path

_spec = importlib.util.spec_from_file_location("fake_tensorrt", Path(__file__).resolve().parents[1] / "fake_tensorrt.py")
_fake = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fake)

sys.modules["tensorrt"] = _fake.make_tensorrt(os.environ.get("FAKE_TRT_VERSION", "10.3.0.26"))
_rt = _fake.make_cudart()
_cuda = types.ModuleType("cuda")
_bindings = types.ModuleType("cuda.bindings")
_bindings.runtime = _rt
_bindings.__version__ = "fake"
_cuda.bindings = _bindings
_mods = {"tensorrt": sys.modules["tensorrt"], "cuda": _cuda, "cuda.bindings": _bindings, "cuda.bindings.runtime": _rt}
for _name, _mod in _mods.items():
    _mod.__spec__ = importlib.machinery.ModuleSpec(_name, None)  # find_spec() callers (torch) need one
sys.modules.update(_mods)
