"""The names every edgeguard ONNX graph uses, and the undefended view of a defended graph.

Export writes graphs with these names (``input`` -> ``probabilities``; a fused defense head reads ``logits`` and
its nodes are prefixed ``defense/``); the runtimes read them back.  ``clean_view`` cuts a defended graph back to
``softmax(logits)``, for measurements (and what an attacker holding the file could do, spec pitfall 12).
"""

from __future__ import annotations

import copy

import numpy as np

from edgeguard.errors import BadInput

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
LOGITS = "logits"
PREFIX = "defense/"
FLAG_OUTPUT = "defense_flag"
PROBE_TOL = 1e-3  # a row "is a distribution" when it is non-negative and sums to 1 within this


def producer(graph, name: str):
    """The node of ``graph`` that outputs tensor ``name``, or None."""
    return next((n for n in graph.node if name in n.output), None)


def clean_view(proto, logits: str = LOGITS):
    """The undefended graph inside a defended one: everything up to the logits, then Softmax."""
    import onnx

    proto = copy.deepcopy(proto)
    g = proto.graph
    needed, keep = {logits}, []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    if producer(g, logits) is None:
        raise BadInput(f"the graph has no tensor named {logits!r}; it was not exported with a defense head")
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    taken = {t for n in keep for t in (*n.input, *n.output)} | {i.name for i in g.input}
    out = OUTPUT_NAME if OUTPUT_NAME not in taken else "clean/" + OUTPUT_NAME  # a wrapped graph may use the name
    g.node.append(onnx.helper.make_node("Softmax", [logits], [out], axis=-1, name="clean/softmax"))
    used = {i for n in g.node for i in n.input}
    kept_inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    del g.output[:]
    g.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    del g.value_info[:]
    return proto


def contract_violation(y: np.ndarray, *, probabilities: bool = True, sums: bool = True) -> str | None:
    """The output contract of an artifact edgeguard did not make, on one answer (N, classes): every entry finite,
    and, when it returns ``probabilities``, in [0, 1] with rows summing to 1 within PROBE_TOL (``sums=False``:
    [0, 1] only).  None when it holds, else what is wrong with the first bad row."""
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(y).all(1)
    if not finite.all():
        r = int(np.flatnonzero(~finite)[0])
        return f"row {r} is not finite ({y[r][~np.isfinite(y[r])][0]})"
    if not probabilities:
        return None
    neg = np.flatnonzero((y < -PROBE_TOL).any(1))
    big = np.flatnonzero((y > 1 + PROBE_TOL).any(1))
    off = np.flatnonzero(np.abs(y.sum(1) - 1) > PROBE_TOL) if sums else np.array([], int)
    bad = sorted(int(v[0]) for v in (neg, big, off) if len(v))
    if not bad:
        return None
    r = bad[0]
    return (f"row {r} has a negative entry ({y[r].min():.4g})" if r in neg else
            f"row {r} has an entry above 1 ({y[r].max():.4g})" if r in big else f"row {r} sums to {y[r].sum():.4g}")


def probe_outputs(y: np.ndarray) -> tuple[str, str]:
    """("probabilities" | "logits", why): probabilities when every row is non-negative and sums to 1."""
    sums = y.sum(1)
    neg = np.flatnonzero((y < -PROBE_TOL).any(1))
    off = np.flatnonzero(np.abs(sums - 1) > PROBE_TOL)
    if not len(neg) and not len(off):
        return "probabilities", f"every probe row is non-negative and sums to 1 (max |sum-1| {np.abs(sums - 1).max():.1e})"
    row = int(neg[0]) if len(neg) else int(off[0])
    why = (f"row {row} has a negative entry ({float(y[row].min()):.3g})" if len(neg)
           else f"row {row} sums to {float(sums[row]):.4g}")
    return "logits", why
