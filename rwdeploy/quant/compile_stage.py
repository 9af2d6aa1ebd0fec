"""The compile stages for checkpoints quantized by `rwdeploy prune --quantize`
(`metadata["quantization"]`, a `QuantSpec`); for other checkpoints they do nothing.

`stage_export_quantized` writes `slim.qdq.onnx` (integer weights behind DequantizeLinear),
checked in ONNX Runtime against the slim torch model on every probe, and reports the counted
storage (its latency is measured beside original and slim by `compile.stage_measure_ort`).
`stage_tvm_quantized` (a target step of every TVM target) builds that graph with TVM for this
host (`slim.qdq.tvm.so`, int8 constants, checked too) and, for an arm/gpu --target, for it
(`slim.qdq.<target>.so`, not runnable here).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from rwdeploy.context import CompileContext, QuantizedSlim
from rwdeploy.errors import VerificationError
from rwdeploy.passes.verify import Closeness, compare_on
from rwdeploy.quant.export import export_float_onnx, write_qdq_onnx
from rwdeploy.quant.onnx_qdq import to_qdq
from rwdeploy.quant.qat import QuantSpec
from rwdeploy.quant.size import model_size
from rwdeploy.quant.tvm_qdq import build_onnx
from rwdeploy.runtime.ort_runner import OrtRunner
from rwdeploy.runtime.targets import get_target

QDQ_ONNX = "slim.qdq.onnx"
QDQ_TVM = "slim.qdq.tvm.so"


def quant_spec(metadata: dict[str, Any] | None) -> QuantSpec | None:
    q = (metadata or {}).get("quantization")
    return QuantSpec.from_dict(q) if q else None


def _check(ctx: CompileContext, name: str, runtime: str, run: Callable[[np.ndarray], np.ndarray]) -> Closeness:
    """`run` (a runtime's inference of file `name`) against the dense slim torch model, on the probes."""
    tolerance = ctx.options.tolerance
    check = compare_on(ctx.dense_slim, lambda x: run(x.numpy()), ctx.probe_inputs, tolerance=tolerance)
    if not check.passed:
        raise VerificationError(
            f"{runtime} output of {name} differs from the quantized slim torch model: max relative error "
            f"{check.max_rel:.3g} > tolerance {tolerance:g}; nothing was written",
            hint="an exporter or runtime problem with quantized weights; please report it with the model")
    return check


def stage_export_quantized(ctx: CompileContext) -> None:
    spec = quant_spec(ctx.loaded.metadata)
    if spec is None:
        return
    opts = ctx.options
    # The dense slim model: sparse packing (when it ran) replaced weights by CSR/BSR arrays.
    ctx.quantized = QuantizedSlim(spec, export_float_onnx(ctx.dense_slim, ctx.example_input, opts.opset))
    info = write_qdq_onnx(ctx.quantized.float_onnx, ctx.path(QDQ_ONNX), bits=spec.bits, per_channel=spec.per_channel)
    check = _check(ctx, QDQ_ONNX, "ONNX Runtime", OrtRunner(ctx.path(QDQ_ONNX), threads=opts.threads).run)
    ctx.sections["quantization"] = {
        "bits": spec.bits, "per_channel": spec.per_channel, "scales": "power of two (fixed point)",
        "onnx": {**info.record.to_dict(), "check": check.to_dict()},
        "storage": model_size(ctx.dense_slim, spec),
    }
    ctx.files["slim_qdq_onnx"] = {"path": QDQ_ONNX, "bytes": info.size_bytes, "opset": info.record.opset,
                                  "weights": info.record.storage}


def stage_tvm_quantized(ctx: CompileContext) -> None:
    """TVM builds of the slim graph with float and with int8-stored weights: for this host (run
    and checked here), and for the compile's --target when that is arm or gpu (built with the
    target's toolchain; it cannot run on this machine, so it is not checked here)."""
    if ctx.quantized is None:
        return
    spec, float_model = ctx.quantized.spec, ctx.quantized.float_onnx
    qdq_model, record = to_qdq(float_model, spec.bits, per_channel=spec.per_channel, int4_storage=False)
    qbuild, qrun = build_onnx(qdq_model, path=ctx.path(QDQ_TVM))
    fbuild, _ = build_onnx(float_model)
    check = _check(ctx, QDQ_TVM, "TVM", qrun)
    ctx.files["slim_qdq_tvm"] = {"path": QDQ_TVM, "bytes": qbuild.library_bytes, "weights": record.storage}
    section = {"target": qbuild.target, "weights": record.storage, "library_bytes": qbuild.library_bytes,
               "float_library_bytes": fbuild.library_bytes, "build_s": round(qbuild.build_s, 3),
               "check": check.to_dict()}
    target = get_target(ctx.options.target, gpu_arch=ctx.options.gpu_arch)
    if target.family != "cpu":
        name = f"slim.qdq.{target.name}.so"
        dbuild, _ = build_onnx(qdq_model, target=target, path=ctx.path(name))
        ctx.files[f"slim_qdq_{target.name}"] = {"path": name, "bytes": dbuild.library_bytes,
                                                "weights": record.storage}
        section["device_build"] = {
            "target": target.name, "tvm_target": dbuild.target, "library_bytes": dbuild.library_bytes,
            "build_s": round(dbuild.build_s, 3), "path": name,
            "check": f"not run here: built for {target.name}; the host build above runs the same graph",
        }
    ctx.sections["quantization"]["tvm"] = section
