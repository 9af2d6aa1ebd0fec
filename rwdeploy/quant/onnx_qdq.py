"""Rewrite an exported float ONNX model so its quantized weights are stored as integers (QDQ form).

Each Conv / Gemm / MatMul weight initializer whose values lie on the b-bit power-of-two grid is
replaced by an integer initializer (INT8, or INT4 when the opset allows it) and a
DequantizeLinear node (per-tensor, or per-output-channel with `axis`). Stock ONNX Runtime runs
the result; activations stay float (weight-only quantization).

The float model must carry weights made by `rwdeploy.quant.convert` (integers times power-of-two
scales). The scales are recomputed here by the same rule, which is idempotent, and every weight
is checked to be exactly integer * scale: a weight off the grid raises `VerificationError`
naming it, instead of silently re-quantizing a float model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from rwdeploy.errors import VerificationError
from rwdeploy.quant.fixed_point import check_bits, dequantize, power_of_two_scale, quantize

INT4_MIN_OPSET = 21  # DequantizeLinear takes INT4 inputs from opset 21 on.
# ORT 1.31 rejects IR versions above 13; 10 is what opset 21 needs.
_IR_FOR_INT4 = 10


@dataclass
class QdqRecord:
    bits: int
    per_channel: bool
    storage: str  # "int8" or "int4"
    opset: int
    layers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "per_channel": self.per_channel, "storage": self.storage,
                "opset": self.opset, "layers": list(self.layers)}


def _int4_tensor(name: str, q: np.ndarray) -> onnx.TensorProto:
    """An INT4 initializer in raw_data: two values per byte, the first in the low nibble.

    (`helper.make_tensor` would store the packed bytes as int32 varints, ~50% larger; the int8
    case likewise goes through `numpy_helper.from_array`, which writes raw bytes: negative
    values as int32 varints take 10 bytes each.)
    """
    flat = q.reshape(-1).astype(np.int16) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, 0)
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    t = onnx.TensorProto()
    t.name, t.data_type = name, TensorProto.INT4
    t.dims.extend(q.shape)
    t.raw_data = packed.tobytes()
    return t


def _weight_axis(node: onnx.NodeProto) -> int | None:
    """Output-channel axis of input 1 of a weight-consuming node, or None if not one."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return 1
    return None


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _raise_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto | None:
    try:
        converted = onnx.version_converter.convert_version(model, target)
        converted.ir_version = min(converted.ir_version, _IR_FOR_INT4)
        onnx.checker.check_model(converted)
        return converted
    except Exception:  # the converter lacks an adapter for some op: keep int8 storage
        return None


def to_qdq(model: onnx.ModelProto, bits: int, *, per_channel: bool = False, int4_storage: bool = True) -> tuple[onnx.ModelProto, QdqRecord]:
    """Return a copy of `model` with integer weights behind DequantizeLinear, and a record per layer."""
    bits = check_bits(bits)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    storage = "int8"
    if bits == 4 and int4_storage:
        if _opset(model) < INT4_MIN_OPSET:
            raised = _raise_opset(model, INT4_MIN_OPSET)
            if raised is not None:
                model = raised
        storage = "int4" if _opset(model) >= INT4_MIN_OPSET else "int8"
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    record = QdqRecord(bits, per_channel, storage, _opset(model))
    done: dict[str, str] = {}
    new_nodes = []
    for node in graph.node:
        axis = _weight_axis(node)
        name = node.input[1] if axis is not None and len(node.input) > 1 else None
        if name is None or name not in inits:
            continue
        if name in done:
            node.input[1] = done[name]
            continue
        w = torch.from_numpy(numpy_helper.to_array(inits[name]).copy())
        if w.dtype != torch.float32:
            continue
        q_axis = axis if per_channel else None
        scale = power_of_two_scale(w, bits, q_axis)
        q = quantize(w, scale, bits, q_axis)
        err = (dequantize(q, scale, q_axis) - w).abs().max().item() if w.numel() else 0.0
        if err != 0.0:
            raise VerificationError(
                f"weight {name} ({node.op_type} {node.name}) is not on the {bits}-bit power-of-two grid "
                f"(max error {err:.3g})", hint="quantize the checkpoint with `rwdeploy prune --quantize` before exporting")
        dq_out = f"{name}_dequantized"
        q_name, s_name = f"{name}_quantized", f"{name}_scale"
        q_np = q.numpy()
        graph.initializer.append(_int4_tensor(q_name, q_np) if storage == "int4" else numpy_helper.from_array(q_np, q_name))
        s_np = scale.numpy().astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(s_np, s_name))
        attrs = {"axis": axis} if per_channel else {}
        new_nodes.append(helper.make_node("DequantizeLinear", [q_name, s_name], [dq_out],
                                          name=f"{name}_DequantizeLinear", **attrs))
        graph.initializer.remove(inits[name])
        for gi in [i for i in graph.input if i.name == name]:  # initializers listed as inputs (old exports)
            graph.input.remove(gi)
        node.input[1] = dq_out
        done[name] = dq_out
        record.layers.append({"weight": name, "op": node.op_type, "shape": list(q_np.shape),
                              "scales": int(s_np.size), "nonzero": int(np.count_nonzero(q_np)),
                              "log2_scale": [int(v) for v in np.log2(s_np).flatten()]})
    # Dequantize nodes read only initializers: putting them first keeps the graph topologically sorted.
    for n in reversed(new_nodes):
        graph.node.insert(0, n)
    onnx.checker.check_model(model)
    return model, record
