"""rwdeploy's sparse custom ops in TVM Relax: converters to `call_tir` kernels, and their timing.

`import_exported_program(ep)` wraps `tvm.relax.frontend.torch.from_exported_program` with a
`custom_convert_map` that turns every `rwdeploy::sparse_linear` / `rwdeploy::sparse_conv2d`
node into a `relax.call_tir` of a TIR kernel specialised to the layer (`runtime.tvm_kernels`).
The kernels are plain TIR, so the module builds for any LLVM target (x86, aarch64).

`time_candidates` builds many kernels into one library and times each on this machine: the
measurement the `pack_sparse` selector decides from.

Threads: TVM's pool is sized from TVM_NUM_THREADS when it starts (default: half the cores on
x86), so this module sets it to every core unless the caller already chose.
"""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from rwdeploy.runtime.tvm_kernels import ConvSpec, LinearSpec, kernel_for, scratch_shapes  # noqa: E402
from rwdeploy.sparse import ops as _ops  # noqa: E402,F401  (registers the custom ops)

OPAQUE = 8  # relax op pattern kOpaque: never fuse our hand-scheduled kernels with neighbours


def host_target() -> tvm.target.Target:
    """The host's LLVM target with its real CPU name ("native" silently means generic code)."""
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def threads() -> int:
    return int(os.environ["TVM_NUM_THREADS"])


def _shape(expr: relax.Expr) -> list[int]:
    return [int(v) for v in expr.ty.shape]


def _dtype(expr: relax.Expr) -> str:
    return str(expr.ty.dtype)


def _prim(bb: relax.BlockBuilder, spec: LinearSpec | ConvSpec) -> relax.GlobalVar:
    # hand-scheduled: Relax must not fuse it, schedulers (dlight, MetaSchedule, tvm_schedule) skip it
    func = kernel_for(spec).with_attr("op_pattern", OPAQUE).with_attr("tirx.is_scheduled", True)
    return bb.add_func(func, spec.name())


def _call(bb: relax.BlockBuilder, spec: LinearSpec | ConvSpec, args: list[relax.Expr],
          out_shape: tuple[int, ...]) -> relax.Var:
    """call_tir of the spec's kernel; its scratch outputs are allocated by Relax and dropped."""
    outs = [relax.TensorType(sh, "float32") for sh in scratch_shapes(spec)]
    outs.append(relax.TensorType(out_shape, "float32"))
    res = bb.emit(relax.call_tir(_prim(bb, spec), args, outs))
    return bb.emit(relax.TupleGetItem(res, len(outs) - 1))


def _bias(bias: relax.Expr | None, n: int) -> relax.Expr:
    return relax.const(np.zeros(n, np.float32)) if bias is None else bias


def _convert_sparse_linear(node, importer) -> relax.Var:
    x, vals, idx, ptr, bias, n_out, n_in, block = importer.retrieve_args(node)
    bb: relax.BlockBuilder = importer.block_builder
    lead = _shape(x)[:-1]
    batch = int(np.prod(lead)) if lead else 1
    x2 = x if len(lead) == 1 else bb.emit(relax.op.reshape(x, (batch, n_in)))
    nnzb = _shape(vals)[0]
    if nnzb == 0:   # an all-zero weight: y = bias
        y = bb.emit(relax.op.broadcast_to(_bias(bias, n_out), (batch, n_out)))
    else:
        spec = LinearSpec(batch, n_out, n_in, "sparse", nnzb, tuple(block), _dtype(idx))
        y = _call(bb, spec, [x2, vals, idx, ptr, _bias(bias, n_out)], (batch, n_out))
    return y if len(lead) == 1 else bb.emit(relax.op.reshape(y, (*lead, n_out)))


def _convert_sparse_conv2d(node, importer) -> relax.Var:
    x, vals, idx, ptr, bias, wshape, block, stride, padding, dilation, groups = importer.retrieve_args(node)
    bb: relax.BlockBuilder = importer.block_builder
    b, c, h, w = _shape(x)
    o, _, kh, kw = wshape
    spec = ConvSpec(b, c, h, w, o, (kh, kw), tuple(stride), tuple(padding), tuple(dilation),
                    int(groups), "sparse", _shape(vals)[0], tuple(block), _dtype(idx))
    oh, ow = spec.out_hw
    if spec.nnz_blocks == 0:
        bias4 = bb.emit(relax.op.reshape(_bias(bias, o), (1, o, 1, 1)))
        return bb.emit(relax.op.broadcast_to(bias4, (b, o, oh, ow)))
    return _call(bb, spec, [x, vals, idx, ptr, _bias(bias, o)], (b, o, oh, ow))


def _convert_dense_linear(node, importer) -> relax.Var:
    args = importer.retrieve_args(node)
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    bb: relax.BlockBuilder = importer.block_builder
    n_out, n_in = _shape(w)
    lead = _shape(x)[:-1]
    batch = int(np.prod(lead)) if lead else 1
    x2 = x if len(lead) == 1 else bb.emit(relax.op.reshape(x, (batch, n_in)))
    spec = LinearSpec(batch, n_out, n_in, "dense")
    y = _call(bb, spec, [x2, w, _bias(bias, n_out)], (batch, n_out))
    return y if len(lead) == 1 else bb.emit(relax.op.reshape(y, (*lead, n_out)))


def _convert_dense_conv2d(node, importer) -> relax.Var:
    from rwdeploy.sparse.formats import index_dtype

    args = list(importer.retrieve_args(node)) + [None] * 7
    x, w, bias, stride, padding, dilation, groups = args[:7]
    pair = lambda v, d: tuple(v) * (2 // len(v)) if isinstance(v, (list, tuple)) else (v or d,) * 2  # noqa: E731
    bb: relax.BlockBuilder = importer.block_builder
    b, c, h, wd = _shape(x)
    o, cg, kh, kw = _shape(w)
    kcol = cg * kh * kw
    idx = str(index_dtype(kcol)).replace("torch.", "")
    spec = ConvSpec(b, c, h, wd, o, (kh, kw), pair(stride, 1), pair(padding, 0), pair(dilation, 1),
                    int(groups or 1), "dense", 0, (1, 1), idx)
    # the dense conv kernel is the sparse one walking a CSR that holds every weight
    vals = bb.emit(relax.op.reshape(w, (o * kcol, 1, 1)))
    col = relax.const(np.tile(np.arange(kcol), o).astype(idx))
    ptr = relax.const((np.arange(o + 1) * kcol).astype(np.int32))
    return _call(bb, spec, [x, vals, col, ptr, _bias(bias, o)], (b, o, *spec.out_hw))


def convert_map(dense_kernels: bool = True) -> dict[str, Callable]:
    """`custom_convert_map` entries for from_exported_program (keys are fx target names).

    With `dense_kernels`, dense conv2d / linear also run rwdeploy's scheduled TIR kernels
    instead of the default Relax lowering, which leaves them unscheduled on CPU (~100x
    slower); the program must then be imported without decomposition, so that conv2d and
    linear reach the converter as themselves.
    """
    cmap = {"sparse_linear.default": _convert_sparse_linear,
            "sparse_conv2d.default": _convert_sparse_conv2d}
    if dense_kernels:
        cmap.update({"linear.default": _convert_dense_linear, "conv2d.default": _convert_dense_conv2d})
    return cmap


def import_exported_program(ep: torch.export.ExportedProgram, *, dense_kernels: bool = True,
                            **kw: Any) -> tvm.IRModule:
    """from_exported_program with rwdeploy's sparse ops (and, by default, dense conv2d/linear)
    converted to rwdeploy's TIR kernels."""
    from tvm.relax.frontend.torch import from_exported_program

    cmap = {**convert_map(dense_kernels), **kw.pop("custom_convert_map", {})}
    kw.setdefault("unwrap_unit_return_tuple", True)
    if dense_kernels:
        kw.setdefault("run_ep_decomposition", False)
    return from_exported_program(ep, custom_convert_map=cmap, **kw)


# ----------------------------------------------------------------------------- timing

@dataclass
class Candidate:
    """One kernel to time: its spec and the arrays it is called with (x first, y excluded)."""
    key: str
    spec: LinearSpec | ConvSpec
    args: Sequence[np.ndarray]
    out_shape: tuple[int, ...]


def dense_as_csr(weight2d: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A dense matrix as CSR arrays holding every entry (the dense conv kernel's input)."""
    from rwdeploy.sparse.formats import index_dtype

    n, k = weight2d.shape
    vals = weight2d.detach().float().reshape(n * k, 1, 1).numpy().copy()
    col = np.tile(np.arange(k), n).astype(str(index_dtype(k)).replace("torch.", ""))
    ptr = (np.arange(n + 1) * k).astype(np.int32)
    return vals, col, ptr


def time_candidates(cands: Sequence[Candidate], target: tvm.target.Target | None = None,
                    *, min_repeat_ms: int = 30, repeat: int = 5) -> dict[str, dict[str, float]]:
    """Build every candidate kernel into one library (one LLVM run) and time each.

    The candidates are timed in rounds, one sample of each per round (TVM's time_evaluator, at
    least `min_repeat_ms` per sample), so that a shared machine's changing load affects all
    alike. Returns key -> {"median_ms", "min_ms", "n"} over the `repeat` samples.
    """
    target = target or host_target()
    funcs = {}
    for c in cands:
        funcs[c.spec.name()] = kernel_for(c.spec)
    lib = tvm.compile(tvm.IRModule(funcs), target=target).mod
    dev = tvm.cpu()
    timers = {}
    for c in cands:
        outs = [*scratch_shapes(c.spec), c.out_shape]
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in c.args]
        args += [tvm.runtime.tensor(np.zeros(sh, np.float32), dev) for sh in outs]
        timers[c.key] = (lib.time_evaluator(c.spec.name(), dev, number=1, repeat=1, min_repeat_ms=min_repeat_ms),
                         args)
    samples: dict[str, list[float]] = {key: [] for key in timers}
    for _ in range(repeat):
        for key, (timer, args) in timers.items():
            samples[key].extend(timer(*args).results)
    return {key: {"median_ms": float(np.median(res)) * 1e3, "min_ms": min(res) * 1e3, "n": len(res)}
            for key, res in samples.items()}


# ----------------------------------------------------------------------------- per-layer formats

def layer_spec(layer: torch.nn.Module, in_shape: Sequence[int], fmt: str,
               matrix=None) -> LinearSpec | ConvSpec:
    """The kernel spec of `layer` (nn.Linear / nn.Conv2d) at input shape `in_shape`."""
    sparse = fmt != "dense"
    nnzb = matrix.nnz_blocks if sparse else 0
    block = tuple(matrix.block) if sparse else (1, 1)
    if isinstance(layer, torch.nn.Linear):
        batch = int(np.prod(in_shape[:-1])) if len(in_shape) > 1 else 1
        idx = str(matrix.indices.dtype).replace("torch.", "") if sparse else "int32"
        return LinearSpec(batch, layer.out_features, layer.in_features, fmt if not sparse else "sparse",
                          nnzb, block, idx)
    from rwdeploy.sparse.formats import index_dtype

    o, cg, kh, kw = layer.weight.shape
    idx = str(matrix.indices.dtype if sparse else index_dtype(cg * kh * kw)).replace("torch.", "")
    b, c, h, w = in_shape
    return ConvSpec(b, c, h, w, o, (kh, kw), tuple(layer.stride), tuple(layer.padding),
                    tuple(layer.dilation), layer.groups, "dense" if not sparse else "sparse",
                    nnzb, block, idx)


def layer_candidate(key: str, layer: torch.nn.Module, in_shape: Sequence[int], matrix) -> Candidate:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(tuple(in_shape)).astype(np.float32)
    bias = np.zeros(layer.weight.shape[0], np.float32)
    fmt = "dense" if matrix is None else matrix.format
    spec = layer_spec(layer, in_shape, fmt, matrix)
    if isinstance(spec, LinearSpec):
        x = x.reshape(spec.batch, spec.in_features)
        out_shape = (spec.batch, spec.out_features)
        if matrix is None:
            arrays = [layer.weight.detach().float().numpy()]
        else:
            arrays = [matrix.values.numpy(), matrix.indices.numpy(), matrix.indptr.numpy()]
    else:
        out_shape = (spec.batch, spec.out_channels, *spec.out_hw)
        if matrix is None:
            arrays = list(dense_as_csr(layer.weight.reshape(layer.weight.shape[0], -1)))
        else:
            arrays = [matrix.values.numpy(), matrix.indices.numpy(), matrix.indptr.numpy()]
    return Candidate(key, spec, [x, *arrays, bias], out_shape)


def measure_layer_formats(layers: Sequence[tuple[str, torch.nn.Module, Sequence[int], dict]],
                          target: tvm.target.Target | None = None) -> dict[str, dict[str, dict]]:
    """Time each layer's dense and packed forms on this machine, all in one TVM build.

    `layers`: (name, nn.Linear|nn.Conv2d, input shape, {format: SparseMatrix}). The
    alternatives are the kernels a TVM artifact can run for the layer: "dense" (rwdeploy's
    scheduled TIR dense kernel) and each format. torch's eager dense layer (oneDNN/MKL) is
    timed too, as a reference outside the artifact ("ref:dense_torch").
    Returns name -> {alternative: {"median_ms", "min_ms", "n"}}.
    """
    from rwdeploy.runtime.latency import time_callable

    cands = []
    for name, layer, shape, packed in layers:
        cands.append(layer_candidate(f"{name}\0dense", layer, shape, None))
        cands += [layer_candidate(f"{name}\0{fmt}", layer, shape, m) for fmt, m in packed.items()]
    timed = time_candidates(cands, target)
    out: dict[str, dict[str, dict]] = {name: {} for name, *_ in layers}
    for key, stats in timed.items():
        name, alt = key.split("\0")
        out[name][alt] = stats
    prev = torch.get_num_threads()
    torch.set_num_threads(threads())
    try:
        for name, layer, shape, _ in layers:
            x = torch.randn(tuple(shape))
            with torch.no_grad():
                st = time_callable(lambda: layer(x), warmup=3, min_runs=10, min_time_s=0.05)
            out[name]["ref:dense_torch"] = {"median_ms": st.median_ms, "min_ms": st.min_ms, "n": st.n}
    finally:
        torch.set_num_threads(prev)
    return out
