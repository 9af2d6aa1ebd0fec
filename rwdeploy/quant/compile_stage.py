"""The compile stages for checkpoints quantized by `rwdeploy prune --quantize`
(`metadata["quantization"]`, a `QuantSpec`); the pipeline runs them for those alone.

`stage_export_quantized` writes `slim.qdq.onnx` (integer weights behind DequantizeLinear),
checked in ONNX Runtime against the slim torch model on every probe, and reports the counted
storage (its latency is measured beside original and slim by `compile.stage_measure_ort`).
`stage_tvm_quantized` (a target step of every TVM target) builds that graph with TVM for this
host (`slim.qdq.tvm.so`, int8 constants, checked too) and, for an arm/gpu --target, for it
(`slim.qdq.<target>.so`, not runnable here).
"""
from __future__ import annotations

from rwdeploy.context import CompileContext, QuantizedSlim
from rwdeploy.quant.export import export_float_onnx, write_qdq_onnx
from rwdeploy.quant.onnx_qdq import to_qdq
from rwdeploy.quant.qat import QuantSpec
from rwdeploy.quant.size import model_size
from rwdeploy.quant.tvm_qdq import build_onnx
from rwdeploy.runtime.ort_runner import OrtRunner
from rwdeploy.runtime.targets import get_target

QDQ_ONNX = "slim.qdq.onnx"
QDQ_TVM = "slim.qdq.tvm.so"
# a runtime's output of a quantized file, checked against the dense slim torch model
DIFFERS = "{runtime} output of {name} differs from the quantized slim torch model"
HINT = "an exporter or runtime problem with quantized weights; please report it with the model"


def stage_export_quantized(ctx: CompileContext) -> None:
    spec, opts = QuantSpec.from_dict(ctx.loaded.metadata["quantization"]), ctx.options
    # The dense slim model: sparse packing (when it ran) replaced weights by CSR/BSR arrays.
    ctx.quantized = QuantizedSlim(spec, export_float_onnx(ctx.dense_slim, ctx.example_input, opts.opset))
    info = write_qdq_onnx(ctx.quantized.float_onnx, ctx.path(QDQ_ONNX), bits=spec.bits, per_channel=spec.per_channel)
    runner = OrtRunner(ctx.path(QDQ_ONNX), threads=opts.threads)
    check = ctx.check(ctx.dense_slim, lambda x: runner.run(x.numpy()),
                      DIFFERS.format(runtime="ONNX Runtime", name=QDQ_ONNX), HINT)
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
    assert ctx.quantized is not None, "runs after stage_export_quantized"
    spec, float_model = ctx.quantized.spec, ctx.quantized.float_onnx
    qdq_model, record = to_qdq(float_model, spec.bits, per_channel=spec.per_channel, int4_storage=False)
    qbuild, qrun = build_onnx(qdq_model, path=ctx.path(QDQ_TVM))
    fbuild, _ = build_onnx(float_model)
    check = ctx.check(ctx.dense_slim, lambda x: qrun(x.numpy()), DIFFERS.format(runtime="TVM", name=QDQ_TVM), HINT)
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
