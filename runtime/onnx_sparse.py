"""Compact ONNX for sparse weights: CSR arrays as initializers, densified by stock ops.

A sparse weight initializer W (rows x cols, any rank: cols = product of the trailing dims)
is replaced by three small initializers - float32 values, column indices in the narrowest
integer type that fits (uint8 / int16 / int32), int32 row pointers - and a subgraph of stock
ai.onnx ops (opset >= 16) that rebuilds W:

    marks = ScatterND(zeros[nnz+1], indptr[1:rows], ones, reduction="add")   # row starts
    rowid = CumSum(marks)[:nnz]                                               # row of each value
    W     = Reshape(ScatterND(zeros[rows*cols], rowid*cols + col, values), W.shape)

Everything in it depends only on initializers, so ONNX Runtime constant-folds it at session
creation with default options: the file is small and the running graph is the dense one
(same speed as dense; no custom op, no custom runtime). A stock-op sparse *computation*
(Gather + Mul + ScatterElements) was not used: per call it runs several ops over all
non-zeros and cannot beat ORT's dense Gemm/Conv kernels at these sizes.

`runtime.onnx_export.export_onnx` calls this for a module with packed layers: the packed
layers are swapped for their dense equivalents in a copy (`dense_copy`), exported by
torch.onnx, then every sparse weight is compacted (`compact_onnx`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from rwdeploy.sparse import PACKED_TYPES

WEIGHT_CONSUMERS = {"Gemm": (1,), "MatMul": (0, 1), "Conv": (1,), "ConvTranspose": (1,)}
MIN_OPSET = 16   # ScatterND reduction="add"


@dataclass
class CompactedWeight:
    name: str
    shape: list[int]
    sparsity: float
    dense_bytes: int
    compact_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _narrow_index(cols: int) -> np.dtype:
    if cols <= 1 << 8:
        return np.dtype(np.uint8)
    if cols <= 1 << 15:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


def _densify(name: str, w: np.ndarray) -> tuple[list[TensorProto], list[onnx.NodeProto]]:
    """Initializers + nodes whose output named `name` equals the dense array `w`."""
    rows = int(w.shape[0]) if w.ndim else 1
    cols = int(w.size // max(rows, 1))
    w2 = w.reshape(rows, cols)
    r, c = np.nonzero(w2)
    nnz = int(r.size)
    p = f"{name}__csr_"
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(tag: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(arr), p + tag))
        return p + tag

    def node(op: str, ins: list[str], tag: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, ins, [p + tag], name=p + tag, **attrs))
        return p + tag

    shape = const("shape", np.array(w.shape, np.int64))
    if nnz == 0:
        nodes.append(helper.make_node("ConstantOfShape", [shape], [name], name=p + "zeros",
                                      value=numpy_helper.from_array(np.zeros(1, np.float32))))
        return inits, nodes
    values = const("values", w2[r, c].astype(np.float32))
    col = const("indices", c.astype(_narrow_index(cols)))
    indptr = np.zeros(rows + 1, np.int64)
    np.add.at(indptr, r + 1, 1)
    ptr = const("indptr", np.cumsum(indptr).astype(np.int32))

    if rows > 1:
        starts = node("Slice", [ptr, const("one", np.array([1], np.int64)),
                                const("rows", np.array([rows], np.int64))], "starts")
        starts64 = node("Cast", [starts], "starts64", to=TensorProto.INT64)
        starts_idx = node("Unsqueeze", [starts64, const("axis_last", np.array([-1], np.int64))], "starts_idx")
        zeros = node("ConstantOfShape", [const("nnz1", np.array([nnz + 1], np.int64))], "zeros_nnz1",
                     value=numpy_helper.from_array(np.zeros(1, np.int64)))
        ones = node("ConstantOfShape", [const("rows1", np.array([rows - 1], np.int64))], "ones",
                    value=numpy_helper.from_array(np.ones(1, np.int64)))
        marks = node("ScatterND", [zeros, starts_idx, ones], "marks", reduction="add")
        rowid_all = node("CumSum", [marks, const("axis0", np.array(0, np.int64))], "rowid_all")
        rowid = node("Slice", [rowid_all, const("zero", np.array([0], np.int64)),
                               const("nnz", np.array([nnz], np.int64))], "rowid")
        base = node("Mul", [rowid, const("cols", np.array(cols, np.int64))], "base")
        col64 = node("Cast", [col], "col64", to=TensorProto.INT64)
        flat = node("Add", [base, col64], "flat")
    else:
        flat = node("Cast", [col], "flat", to=TensorProto.INT64)
    flat_idx = node("Unsqueeze", [flat, p + "axis_last" if rows > 1 else
                                  const("axis_last", np.array([-1], np.int64))], "flat_idx")
    zeros_w = node("ConstantOfShape", [const("size", np.array([rows * cols], np.int64))], "zeros_w",
                   value=numpy_helper.from_array(np.zeros(1, np.float32)))
    dense_flat = node("ScatterND", [zeros_w, flat_idx, values], "dense_flat")
    nodes.append(helper.make_node("Reshape", [dense_flat, shape], [name], name=p + "reshape"))
    return inits, nodes


def compact_onnx(model: onnx.ModelProto, *, min_sparsity: float = 0.5,
                 min_elements: int = 256) -> tuple[onnx.ModelProto, list[CompactedWeight]]:
    """A copy of `model` with every sparse weight initializer stored as CSR (see module doc).

    A weight qualifies when a Gemm/MatMul/Conv reads it, it is float32, has at least
    `min_elements` elements and `min_sparsity` zeros, and the CSR form is smaller.
    """
    model = copy.deepcopy(model)
    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ValueError(f"compact ONNX needs opset >= {MIN_OPSET} (ScatterND add), model has {opset}")
    weights = {g.node[i].input[j] for i in range(len(g.node))
               for j in WEIGHT_CONSUMERS.get(g.node[i].op_type, ()) if j < len(g.node[i].input)}
    graph_inputs = {i.name for i in g.input}
    new_inits, new_nodes, kept, done = [], [], [], []
    for init in g.initializer:
        arr = numpy_helper.to_array(init) if init.name in weights and init.name not in graph_inputs \
            and init.data_type == TensorProto.FLOAT else None
        if arr is None or arr.size < min_elements or arr.ndim < 2:
            kept.append(init)
            continue
        zero_frac = float((arr == 0).mean())
        inits, nodes = _densify(init.name, arr)
        compact = sum(numpy_helper.to_array(t).nbytes for t in inits)
        if zero_frac < min_sparsity or compact >= arr.nbytes:
            kept.append(init)
            continue
        new_inits += inits
        new_nodes += nodes
        done.append(CompactedWeight(init.name, list(arr.shape), zero_frac, arr.nbytes, compact))
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    old_nodes = list(g.node)
    del g.node[:]
    g.node.extend(new_nodes + old_nodes)       # the densify subgraphs read only initializers
    onnx.checker.check_model(model)
    return model, done


def has_packed_layers(module: torch.nn.Module) -> bool:
    return any(isinstance(m, PACKED_TYPES) for m in module.modules())


def dense_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` with every packed layer replaced by its dense nn.Linear/nn.Conv2d."""
    out = copy.deepcopy(module)
    for name, sub in list(out.named_modules()):
        if isinstance(sub, PACKED_TYPES):
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, leaf, sub.to_dense())
    if isinstance(out, torch.fx.GraphModule):
        out.recompile()
    return out
