"""The names every edgeguard ONNX graph uses, and the undefended view of a defended graph.

Export writes graphs with these names (``input`` -> ``probabilities``; a fused defense head reads ``logits`` and
its nodes are prefixed ``defense/``); the runtimes read them back.  ``clean_view`` cuts a defended graph back to
``softmax(logits)``, for measurements (and what an attacker holding the file could do, spec pitfall 12).
"""

from __future__ import annotations

import copy

from edgeguard.errors import BadInput

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
LOGITS = "logits"
PREFIX = "defense/"
FLAG_OUTPUT = "defense_flag"


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
    g.node.append(onnx.helper.make_node("Softmax", [logits], [OUTPUT_NAME], axis=-1, name="clean/softmax"))
    used = {i for n in g.node for i in n.input}
    kept_inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    del g.output[:]
    g.output.append(onnx.helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, None))
    del g.value_info[:]
    return proto
