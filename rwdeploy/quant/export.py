"""Export a quantized model as a QDQ ONNX file: integer weights behind DequantizeLinear."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from rwdeploy.io import atomic_file
from rwdeploy.quant.onnx_qdq import QdqRecord, to_qdq
from rwdeploy.runtime.onnx_export import MAX_ORT_IR_VERSION, export_onnx


@dataclass
class QdqExport:
    path: str
    size_bytes: int
    record: QdqRecord

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.size_bytes, **self.record.to_dict()}


def export_float_onnx(module: nn.Module, example_input: torch.Tensor, opset: int = 17) -> onnx.ModelProto:
    """The float ONNX graph of `module` with batch norms as their own nodes.

    Folding BN into the convolution would multiply the quantized weights by BN scales and move
    them off the grid; kept apart, the file holds the quantized weights themselves.
    """
    with tempfile.TemporaryDirectory(prefix="rwdeploy-qdq-") as tmp:
        float_path = Path(tmp) / "float.onnx"
        export_onnx(module, example_input, float_path, opset=opset, fold_batchnorm=False)
        return onnx.load(str(float_path))


def write_qdq_onnx(float_model: onnx.ModelProto, path: str | os.PathLike, *, bits: int, per_channel: bool,
                   int4_storage: bool = True) -> QdqExport:
    """Rewrite `float_model` (weights on the grid) to QDQ form and write it to `path` atomically."""
    qdq, record = to_qdq(float_model, bits, per_channel=per_channel, int4_storage=int4_storage)
    qdq.ir_version = min(qdq.ir_version, MAX_ORT_IR_VERSION)
    with atomic_file(path) as tmp_file:
        onnx.save(qdq, str(tmp_file))
    return QdqExport(str(path), Path(path).stat().st_size, record)


def export_qdq_onnx(module: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, *, bits: int,
                    per_channel: bool, opset: int = 17, int4_storage: bool = True) -> QdqExport:
    """Write `module` (weights already on the quantization grid) to `path` as QDQ ONNX."""
    return write_qdq_onnx(export_float_onnx(module, example_input, opset), path, bits=bits,
                          per_channel=per_channel, int4_storage=int4_storage)
