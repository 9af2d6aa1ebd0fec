"""Each layer's dense and packed (CSR/BSR) forms as the kernels a TVM artifact runs, built to measure.

`candidate_module(cands)` builds one Relax function per candidate: `cand_<i>(x) -> y`, the
layer alone with its weights as constants. Packed forms run rwdeploy's sparse kernels (the
same emission as the artifact's converters, `runtime.tvm_sparse`); the dense form is the
plain Relax conv2d / matmul that the artifact's CPU pipeline schedules (`tvm_build.cpu_pipeline`).
A dense conv among packed layers takes and gives the packed layers' NCHW while the pipeline
computes it in NHWC, so its candidate includes both conversions: timed without them, MobileNetV2's
stem measured faster dense, and the packed artifact then spent more on the transposes around it
than the conv saved (90 %: 2.9 -> 5.4 ms). A depthwise conv a packed artifact runs in rwdeploy's
dense kernel in NCHW itself (`tvm_sparse.dense_in_packed_layout`), so that is what its "dense" times.
`build_candidates` compiles them all in one build for a target (host or aarch64).

Measurers: `time_candidates` (this machine, TVM's time_evaluator) and
`measure_layer_formats` (the `pack_sparse` timer contract) here; instruction counts on the
emulated aarch64 device or latency on an RPC board in `runtime.arm_layer_timer`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import tvm
from tvm import relax

from rwdeploy.runtime import tvm_sparse
from rwdeploy.sparse.formats import SparseMatrix

Layers = Sequence[tuple[str, torch.nn.Module, Sequence[int], dict[str, SparseMatrix]]]


@dataclass
class Candidate:
    """One alternative of one layer: `matrix` None = the dense layer."""

    key: str
    layer: torch.nn.Module
    in_shape: tuple[int, ...]
    matrix: SparseMatrix | None = None
    index: int = 0          # position in its list: keeps function names unique

    @property
    def function(self) -> str:
        return f"cand{self.index}_" + "".join(ch if ch.isalnum() else "_" for ch in self.key)

    @property
    def packed_layout(self) -> bool:
        """The dense form of a conv that a packed artifact runs in the packed (NCHW) layout."""
        layer = self.layer
        return isinstance(layer, torch.nn.Conv2d) and (
            self.matrix is not None or tvm_sparse.dense_in_packed_layout(tuple(layer.weight.shape), layer.groups))

    def input_shape(self) -> tuple[int, ...]:
        """The shape the candidate function takes (a conv's: NCHW, as among packed layers)."""
        return self.in_shape


def _const(t: torch.Tensor | np.ndarray) -> relax.Constant:
    return relax.const(t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t)


def _bias(layer: torch.nn.Module) -> relax.Expr | None:
    return None if layer.bias is None else _const(layer.bias.float())


def _emit_packed(bb: relax.BlockBuilder, c: Candidate, x: relax.Var) -> relax.Expr:
    m, layer = c.matrix, c.layer
    if isinstance(layer, torch.nn.Linear):
        return tvm_sparse.sparse_linear_call(bb, x, layer.out_features, _const(m.values), _const(m.indices),
                                             _const(m.indptr), _bias(layer), tuple(m.block))
    call = tvm_sparse.conv_call(bb, x, tuple(layer.weight.shape), _const(m.values), m.indices.numpy(),
                                _const(m.indptr), _bias(layer), tuple(layer.stride), tuple(layer.padding),
                                tuple(layer.dilation), layer.groups, tuple(m.block), "sparse")
    return tvm_sparse.emit_conv(bb, call)


def _emit_dense(bb: relax.BlockBuilder, c: Candidate, x: relax.Var) -> relax.Expr:
    layer, op = c.layer, relax.op
    w = layer.weight.detach().float()
    if isinstance(layer, torch.nn.Linear):
        y = bb.emit(op.matmul(x, _const(w.t().contiguous())))
    elif c.packed_layout:   # bias and all in the kernel, as the artifact's converter emits it
        return tvm_sparse.emit_conv(bb, tvm_sparse.dense_conv_call(
            bb, x, w.numpy(), _bias(layer), tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation),
            layer.groups))
    else:   # NCHW in and out around the NHWC conv, as between packed neighbours
        nhwc = bb.emit(op.permute_dims(x, [0, 2, 3, 1]))
        y = bb.emit(op.nn.conv2d(nhwc, _const(w.permute(2, 3, 1, 0).contiguous()), tuple(layer.stride),
                                 tuple(layer.padding), tuple(layer.dilation), layer.groups,
                                 data_layout="NHWC", kernel_layout="HWIO"))
        if layer.bias is not None:
            y = bb.emit(op.add(y, _bias(layer)))
        return bb.emit(op.permute_dims(y, [0, 3, 1, 2]))
    return y if layer.bias is None else bb.emit(op.add(y, _bias(layer)))


def candidate_module(cands: Sequence[Candidate]) -> tvm.IRModule:
    """One Relax function per candidate (`Candidate.function`), weights as constants."""
    bb = relax.BlockBuilder()
    for c in cands:
        x = relax.Var("x", relax.TensorType(c.input_shape(), "float32"))
        with bb.function(c.function, [x]):
            with bb.dataflow():
                y = _emit_dense(bb, c, x) if c.matrix is None else _emit_packed(bb, c, x)
                out = bb.emit_output(y)
            bb.emit_func_output(out)
    return bb.get()


def build_candidates(cands: Sequence[Candidate], target: tvm.target.Target) -> Any:
    """The relax executable of `candidate_module(cands)`, built like an artifact for `target`."""
    from rwdeploy.runtime.tvm_build import cpu_pipeline

    return tvm.compile(candidate_module(cands), target=target, relax_pipeline=cpu_pipeline(target, {}))


def candidates_of(layers: Layers) -> list[Candidate]:
    out: list[Candidate] = []
    for name, layer, shape, packed in layers:
        for fmt, m in [("dense", None), *packed.items()]:
            out.append(Candidate(f"{name}\0{fmt}", layer, tuple(shape), m, len(out)))
    return out


def by_layer(cands: Sequence[Candidate], values: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """{layer name: {alternative: stats}} from {candidate key: stats}."""
    out: dict[str, dict[str, dict]] = {}
    for c in cands:
        name, alt = c.key.split("\0")
        out.setdefault(name, {})[alt] = values[c.key]
    return out


def time_candidates(cands: Sequence[Candidate], target: tvm.target.Target | None = None,
                    *, min_repeat_ms: int = 30, repeat: int = 5) -> dict[str, dict[str, float]]:
    """Build every candidate (one build) and time each on this machine.

    The candidates are timed in rounds, one sample of each per round (TVM's time_evaluator, at
    least `min_repeat_ms` per sample), so that a shared machine's changing load affects all
    alike. Returns key -> {"median_ms", "min_ms", "n"} over the `repeat` samples.
    """
    target = target or tvm_sparse.host_target()
    dev = tvm.cpu()
    vm = relax.VirtualMachine(build_candidates(cands, target), dev)
    rng = np.random.default_rng(0)
    timers = {}
    for c in cands:
        x = tvm.runtime.tensor(rng.standard_normal(c.input_shape()).astype(np.float32), dev)
        timers[c.key] = (vm.time_evaluator(c.function, dev, number=1, repeat=1, min_repeat_ms=min_repeat_ms), x)
    samples: dict[str, list[float]] = {key: [] for key in timers}
    for _ in range(repeat):
        for key, (timer, x) in timers.items():
            samples[key].extend(timer(x).results)
    return {key: {"median_ms": float(np.median(res)) * 1e3, "min_ms": min(res) * 1e3, "n": len(res)}
            for key, res in samples.items()}


def measure_layer_formats(layers: Layers, target: tvm.target.Target | None = None) -> dict[str, dict[str, dict]]:
    """Time each layer's dense and packed forms on this machine, all in one TVM build.

    `layers`: (name, nn.Linear|nn.Conv2d, input shape, {format: SparseMatrix}). The
    alternatives are the kernels a TVM artifact can run for the layer: "dense" (the scheduled
    dense conv/matmul of the CPU pipeline) and each format. torch's eager dense layer
    (oneDNN/MKL) is timed too, as a reference outside the artifact ("ref:dense_torch").
    Returns name -> {alternative: {"median_ms", "min_ms", "n"}}.
    """
    from rwdeploy.runtime.latency import time_callable

    cands = candidates_of(layers)
    out = by_layer(cands, time_candidates(cands, target))
    prev = torch.get_num_threads()
    torch.set_num_threads(tvm_sparse.threads())
    try:
        for name, layer, shape, _ in layers:
            x = torch.randn(tuple(shape))
            with torch.no_grad():
                st = time_callable(lambda: layer(x), warmup=3, min_runs=10, min_time_s=0.05)
            out[name]["ref:dense_torch"] = {"median_ms": st.median_ms, "min_ms": st.min_ms, "n": st.n}
    finally:
        torch.set_num_threads(prev)
    return out
