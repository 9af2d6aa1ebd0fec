"""Export a torch module to an ONNX file that stock ONNX Runtime loads.

Uses the TorchScript exporter (`dynamo=False`): it honours the requested opset exactly and
keeps every weight inside the one file. The batch dimension is exported as dynamic so one
file serves every batch size the latency table asks for. The exporter never mutates the
module: it works on a deep copy, put in eval mode.
"""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import fx, nn

from rwdeploy.errors import ExportError

MIN_OPSET = 17
# The newest ONNX IR version ONNX Runtime 1.18+ loads; files above it are rejected at load.
MAX_ORT_IR_VERSION = 10
INPUT_NAME = "input"
OUTPUT_NAME = "output"


class OnnxExportError(ExportError):
    """The model could not be expressed as a valid ONNX file."""


@dataclass(frozen=True)
class OnnxExportInfo:
    path: str
    opset: int
    ir_version: int
    size_bytes: int
    dynamic_batch: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _exportable_copy(module: nn.Module) -> nn.Module:
    """An independent copy in eval mode (the exporter toggles training flags and traces).

    A module unlifted from `torch.export` (`ExportedProgram.module()`) refuses `train()`, which
    the TorchScript exporter calls; rebuilding it as a plain GraphModule over the same graph and
    submodules removes that restriction without changing what it computes.
    """
    clone = copy.deepcopy(module)
    if isinstance(clone, fx.GraphModule):
        clone = fx.GraphModule(clone, clone.graph)
    return clone.eval()


def export_onnx(
    module: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    opset: int = MIN_OPSET,
    *,
    dynamic_batch: bool = True,
    fold_batchnorm: bool = True,
) -> OnnxExportInfo:
    """Write `module` as ONNX to `path` (opset >= 17, weights inside, checked by onnx.checker).

    `fold_batchnorm=False` keeps BatchNormalization nodes instead of folding them into the
    preceding convolution's weights (quantized weights must reach the file unchanged).

    A module with packed sparse layers (`rwdeploy.sparse`) is exported through its dense
    equivalent, then every sparse weight is stored compactly (CSR arrays densified by stock
    ops that ONNX Runtime folds at load: `rwdeploy.runtime.onnx_sparse`).
    """
    from rwdeploy.runtime import onnx_sparse

    packed = onnx_sparse.has_packed_layers(module)
    if packed:
        module = onnx_sparse.dense_copy(module)
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} < {MIN_OPSET}")
    path = Path(path)
    exportable = _exportable_copy(module)
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter is deprecated in favour of dynamo=True, which cannot pin
            # opset 17; the warning is expected and says nothing about this model.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                exportable,
                (example_input,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
                # EVAL folds Conv+BN in the exporter's peephole pass; PRESERVE (of an eval-mode
                # copy) exports the same computation with the BN kept as its own node.
                training=torch.onnx.TrainingMode.EVAL if fold_batchnorm else torch.onnx.TrainingMode.PRESERVE,
            )
    except Exception as err:  # the exporter raises many kinds for unsupported ops
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OnnxExportError(f"ONNX export failed ({type(err).__name__}: {first})",
                              hint="the slim .pt2 is unaffected; report the op that failed") from None

    model = onnx.load(str(path))
    if packed:
        model, _ = onnx_sparse.compact_onnx(model)
    filled = _uniform_constants_as_fills(model)
    if model.ir_version > MAX_ORT_IR_VERSION or packed or filled:
        model.ir_version = min(model.ir_version, MAX_ORT_IR_VERSION)
        onnx.save(model, str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0]
        raise OnnxExportError(f"exported ONNX file fails onnx.checker ({first})") from None
    opsets = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    return OnnxExportInfo(str(path), opsets[0] if opsets else opset, int(model.ir_version),
                          path.stat().st_size, dynamic_batch)


# Constants at least this large that hold one repeated value are stored as a fill instead.
MIN_FILL_ELEMENTS = 64


def _uniform_constants_as_fills(model: onnx.ModelProto) -> int:
    """Replace every large Constant node holding one repeated value (the ones image the border
    kernels of removed channels are convolved with, which the exporter's constant folding
    materialises once per use) by ConstantOfShape: same tensor, a few bytes in the file.
    ONNX Runtime folds it back at session creation. Returns how many were replaced."""
    nodes, replaced = [], 0
    for node in model.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        arr = numpy_helper.to_array(value) if value is not None and len(node.attribute) == 1 else None
        if arr is None or arr.size < MIN_FILL_ELEMENTS or not (arr == arr.flat[0]).all():
            nodes.append(node)
            continue
        shape_name = f"{node.output[0]}__shape"
        nodes.append(helper.make_node("Constant", [], [shape_name],
                                      value=numpy_helper.from_array(np.array(arr.shape, np.int64), shape_name)))
        nodes.append(helper.make_node("ConstantOfShape", [shape_name], [node.output[0]], name=node.name,
                                      value=numpy_helper.from_array(arr.reshape(-1)[:1].copy())))
        replaced += 1
    if replaced:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return replaced
