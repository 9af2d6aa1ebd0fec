"""Fold BatchNormalization through the constant a slim model adds after a convolution.

Removing a channel whose value is a constant (its filter zeroed, its BN bias not) leaves that
constant's contribution to the next convolution, which near the zero-padded border depends on
the position: `remove_zero_channels` adds it back as `conv(x) + conv(ones, kernel)` right after
the convolution, before the BN that follows. The TorchScript exporter folds a BN only into a
convolution it directly follows, so in the file every such layer stayed Conv -> Add -> BN, and
ONNX Runtime, which fuses Conv + Add + ReLU and Conv + BN but not Conv + Add + BN, ran the BN
as its own pass over the tensor (and a kernel that works in a blocked channel layout had to
convert back to plain NCHW before it).

Since BN(conv(x) + m) = conv'(x) + s * m, with conv' the convolution with BN folded into its
weights and bias and s = scale / sqrt(var + eps), `fold_batchnorm_through_constant_adds`
rewrites each Conv -> Add(constant) -> BN into Conv' -> Add(Mul(constant, s)). The constant
stays the small expression it was (ONNX Runtime folds `Mul` of constants at session creation),
so the file does not grow by a dense map.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _inputs_reaching(graph: onnx.GraphProto) -> set[str]:
    """Names of the values computed from a graph input (everything else is a constant)."""
    live = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    for node in graph.node:  # ONNX files list nodes in topological order
        if any(name in live for name in node.input):
            live.update(node.output)
    return live


def _fresh(name: str, taken: set[str]) -> str:
    out, k = name, 0
    while out in taken:
        k += 1
        out = f"{name}_{k}"
    taken.add(out)
    return out


def fold_batchnorm_through_constant_adds(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every `BN(Add(Conv(x, W[, b]), c))` whose constant `c` depends on no
    graph input, whose Conv and Add each feed only the next node, and whose weights and BN
    parameters are initializers, as `Add(Conv(x, W', b'), Mul(c, s))`. Returns how many."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for out in graph.output:
        readers[out.name] = readers.get(out.name, 0) + 1
    live = _inputs_reaching(graph)
    taken = set(inits) | set(producer) | {i.name for i in graph.input}

    muls: dict[int, Any] = {}  # id(add node) -> the Mul to insert before it
    dropped: set[int] = set()
    for bn in graph.node:
        plan = _fold_plan(bn, producer, readers, inits, live)
        if plan is None:
            continue
        add, conv, side = plan
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        scale, shift, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        s = scale / np.sqrt(var + eps)
        weight = numpy_helper.to_array(inits[conv.input[1]])
        bias = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2]
                else np.zeros(weight.shape[0]))
        dtype = weight.dtype
        w_name = _fresh(f"{conv.input[1]}__bn", taken)
        b_name = _fresh(f"{conv.output[0]}__bn_bias", taken)
        s_name = _fresh(f"{bn.output[0]}__scale", taken)
        graph.initializer.extend([
            numpy_helper.from_array((weight * s.reshape(-1, *[1] * (weight.ndim - 1))).astype(dtype), w_name),
            numpy_helper.from_array(((bias - mean) * s + shift).astype(dtype), b_name),
            # per output channel, broadcast over the constant's spatial axes (rank of the output - 1)
            numpy_helper.from_array(s.reshape(-1, *[1] * (weight.ndim - 2)).astype(dtype), s_name),
        ])
        conv.input[1] = w_name
        if len(conv.input) > 2:
            conv.input[2] = b_name
        else:
            conv.input.append(b_name)
        scaled = _fresh(f"{add.input[side]}__bn", taken)
        muls[id(add)] = helper.make_node("Mul", [add.input[side], s_name], [scaled], name=f"{bn.name}__folded")
        add.input[side] = scaled
        add.output[0] = bn.output[0]
        dropped.add(id(bn))
    if not muls:
        return 0
    nodes = []
    for node in graph.node:
        if id(node) in dropped:
            continue
        if id(node) in muls:
            nodes.append(muls[id(node)])
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unread_initializers(graph)
    return len(muls)


def _fold_plan(bn: Any, producer: dict[str, Any], readers: dict[str, int], inits: dict[str, Any],
               live: set[str]) -> tuple[Any, Any, int] | None:
    """(the Add, the Conv, the index of the Add's constant input) when `bn` can be folded."""
    if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or len(bn.input) != 5:
        return None
    if any(a.name == "training_mode" and a.i for a in bn.attribute) or not all(n in inits for n in bn.input[1:]):
        return None
    add = producer.get(bn.input[0])
    if add is None or add.op_type != "Add" or len(add.input) != 2 or readers.get(add.output[0]) != 1:
        return None
    for side in (0, 1):
        conv = producer.get(add.input[1 - side])
        if (conv is not None and conv.op_type == "Conv" and readers.get(conv.output[0]) == 1
                and add.input[side] not in live and conv.input[1] in inits
                and (len(conv.input) < 3 or not conv.input[2] or conv.input[2] in inits)
                and numpy_helper.to_array(inits[conv.input[1]]).shape[0] == _channels(inits[bn.input[1]])):
            return add, conv, side
    return None


def _channels(tensor: Any) -> int:
    return int(np.prod(tensor.dims)) if tensor.dims else 1


def _drop_unread_initializers(graph: onnx.GraphProto) -> None:
    read = ({name for node in graph.node for name in node.input} | {o.name for o in graph.output}
            | {i.name for i in graph.input})
    kept = [t for t in graph.initializer if t.name in read]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)
