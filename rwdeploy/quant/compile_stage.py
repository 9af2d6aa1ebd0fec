"""The compile stage for quantized checkpoints: QDQ ONNX (+ TVM build with integer weights).

A checkpoint written by `rwdeploy prune --quantize` carries `metadata["quantization"]` (a
`QuantSpec`). For such a checkpoint, after the slim model is verified and exported, this stage

* writes `slim.qdq.onnx` (integer weights behind DequantizeLinear), checks ONNX Runtime's output
  against the slim torch model on every probe input, and measures its latency when measuring;
* builds the same graph with TVM for this host (`slim.qdq.tvm.so`, int8 constants in the
  library) and checks its output too; for an arm/gpu --target also `slim.qdq.<target>.so`;
* reports sizes: the float and QDQ files, the TVM libraries with float and integer weights, and
  the counted storage (dense float32, dense b-bit, sparse b-bit).

For other checkpoints it does nothing.
"""
from __future__ import annotations

from typing import Any

import onnx
import torch

from rwdeploy.errors import VerificationError
from rwdeploy.quant.export import export_float_onnx, write_qdq_onnx
from rwdeploy.quant.onnx_qdq import to_qdq
from rwdeploy.quant.qat import QuantSpec
from rwdeploy.quant.size import model_size
from rwdeploy.runtime.ort_runner import OrtRunner

QDQ_ONNX = "slim.qdq.onnx"
QDQ_TVM = "slim.qdq.tvm.so"


def quant_spec(metadata: dict[str, Any] | None) -> QuantSpec | None:
    q = (metadata or {}).get("quantization")
    return QuantSpec.from_dict(q) if q else None


def _check(name: str, runtime: str, module: torch.nn.Module, run, probes: list[torch.Tensor], tolerance: float,
           max_errors) -> dict[str, float]:
    worst_abs = worst_rel = 0.0
    for x in probes:
        abs_err, rel_err = max_errors(module(x), torch.from_numpy(run(x.numpy())))
        worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
    if worst_rel > tolerance:
        raise VerificationError(
            f"{runtime} output of {name} differs from the quantized slim torch model: max relative error "
            f"{worst_rel:.3g} > tolerance {tolerance:g}; nothing was written",
            hint="an exporter or runtime problem with quantized weights; please report it with the model")
    return {"max_abs": worst_abs, "max_rel": worst_rel}


def stage_export_quantized(ctx: Any) -> None:
    from rwdeploy.compile import max_errors  # the pipeline imports this module

    spec = quant_spec(ctx.loaded.metadata)
    if spec is None:
        return
    opts = ctx.options
    # The dense slim model: sparse packing (when it ran) replaced weights by CSR/BSR arrays.
    slim = ctx.unpacked if getattr(ctx, "unpacked", None) is not None else ctx.slim
    float_model = export_float_onnx(slim, ctx.example_input, opts.opset)
    info = write_qdq_onnx(float_model, ctx.path(QDQ_ONNX), bits=spec.bits, per_channel=spec.per_channel)
    runner = OrtRunner(ctx.path(QDQ_ONNX), threads=opts.threads)
    section: dict[str, Any] = {
        "bits": spec.bits, "per_channel": spec.per_channel, "scales": "power of two (fixed point)",
        "onnx": {**info.record.to_dict(), "check": _check(QDQ_ONNX, "ONNX Runtime", slim, runner.run,
                                                          ctx.probe_inputs, opts.tolerance, max_errors)},
        "storage": model_size(slim, spec),
    }
    ctx.files["slim_qdq_onnx"] = {"path": QDQ_ONNX, "bytes": info.size_bytes, "opset": info.record.opset,
                                  "weights": info.record.storage}
    section["tvm"] = _tvm_builds(ctx, spec, max_errors, slim, float_model)
    if opts.measure:
        for batch in opts.batches:
            x = ctx.loaded.example_input(batch=batch, seed=opts.seed).numpy()
            stats = runner.measure(x, warmup=opts.warmup, runs=opts.runs, min_time_s=opts.min_time_s)
            ctx.latency.append({
                "runtime": "onnxruntime", "target": opts.target, "variant": "quantized", "batch": batch,
                "median_ms": stats.median_ms, "p90_ms": stats.p90_ms, "n": stats.n, "warmup": stats.warmup,
                "threads": opts.threads, "emulated": False, "provider": "CPUExecutionProvider",
            })
    ctx.sections["quantization"] = section


def _tvm_builds(ctx: Any, spec: QuantSpec, max_errors, slim: torch.nn.Module,
                float_model: onnx.ModelProto) -> dict[str, Any]:
    """TVM builds of the slim graph with float and with int8-stored weights: for this host (run
    and checked here), and for the compile's --target when that is arm or gpu (built with the
    target's toolchain; it cannot run on this machine, so it is not checked here)."""
    from rwdeploy.quant.tvm_qdq import build_onnx
    from rwdeploy.runtime.targets import get_target

    opts = ctx.options
    qdq_model, record = to_qdq(float_model, spec.bits, per_channel=spec.per_channel, int4_storage=False)
    qbuild, qrun = build_onnx(qdq_model, path=ctx.path(QDQ_TVM))
    fbuild, _ = build_onnx(float_model)
    check = _check(QDQ_TVM, "TVM", slim, qrun, ctx.probe_inputs, opts.tolerance, max_errors)
    ctx.files["slim_qdq_tvm"] = {"path": QDQ_TVM, "bytes": qbuild.library_bytes, "weights": record.storage}
    section = {"target": qbuild.target, "weights": record.storage, "library_bytes": qbuild.library_bytes,
               "float_library_bytes": fbuild.library_bytes, "build_s": round(qbuild.build_s, 3), "check": check}
    target = get_target(opts.target, gpu_arch=opts.gpu_arch)
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
    return section
