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

A 1x1 conv that feeds a depthwise conv runs inside the depthwise kernel when it is CSR
(`tvm_conv_kernels.fused_pointwise_depthwise_kernel`): its wide output never goes to memory.
Timed alone, a block format can beat CSR there and still lose once the pair is counted
(MobileNetV2 90 %: bsr4x1 for a 24 -> 144 expansion, 0.35 ms with its depthwise conv against 0.14
fused). `pair_candidates` times such pairs as the artifact runs them, fused, beside the layers.

Measurers: `time_candidates` (this machine, TVM's time_evaluator) and
`measure_layer_formats` (the `pack_sparse` timer contract) here; instruction counts on the
emulated aarch64 device or latency on an RPC board in `runtime.arm_layer_timer`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
import tvm
from tvm import relax

from rwdeploy.runtime import tvm_sparse
from rwdeploy.runtime.tvm_conv_kernels import can_fuse_pointwise
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


@dataclass
class FusedPair:
    """A CSR 1x1 conv computed inside the depthwise conv it feeds (`dw.matrix` None: dense)."""

    key: tuple[str, str, str]     # (1x1 layer, depthwise layer, "csr+<depthwise format>")
    pw: Candidate
    dw: Candidate
    index: int = 0

    @property
    def function(self) -> str:
        return f"pair{self.index}_" + "".join(ch if ch.isalnum() else "_" for ch in "_".join(self.key))

    def input_shape(self) -> tuple[int, ...]:
        return self.pw.in_shape


def _const(t: torch.Tensor | np.ndarray) -> relax.Constant:
    return relax.const(t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t)


def _bias(layer: torch.nn.Module) -> relax.Expr | None:
    return None if layer.bias is None else _const(layer.bias.float())


def _conv_call(bb: relax.BlockBuilder, c: Candidate, x: relax.Expr | None,
               in_shape: tuple[int, ...] | None = None) -> tvm_sparse.ConvCall:
    """The ConvCall of a conv candidate in the packed (NCHW) layout, not yet emitted."""
    layer, m = c.layer, c.matrix
    if m is None:
        return tvm_sparse.dense_conv_call(bb, x, layer.weight.detach().float().numpy(), _bias(layer),
                                          tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation),
                                          layer.groups, in_shape)
    return tvm_sparse.conv_call(bb, x, tuple(layer.weight.shape), _const(m.values), m.indices.numpy(),
                                _const(m.indptr), _bias(layer), tuple(layer.stride), tuple(layer.padding),
                                tuple(layer.dilation), layer.groups, tuple(m.block), "sparse", in_shape=in_shape)


def _emit_packed(bb: relax.BlockBuilder, c: Candidate, x: relax.Var) -> relax.Expr:
    m, layer = c.matrix, c.layer
    if isinstance(layer, torch.nn.Linear):
        return tvm_sparse.sparse_linear_call(bb, x, layer.out_features, _const(m.values), _const(m.indices),
                                             _const(m.indptr), _bias(layer), tuple(m.block))
    return tvm_sparse.emit_conv(bb, _conv_call(bb, c, x))


def _emit_dense(bb: relax.BlockBuilder, c: Candidate, x: relax.Var) -> relax.Expr:
    layer, op = c.layer, relax.op
    w = layer.weight.detach().float()
    if isinstance(layer, torch.nn.Linear):
        y = bb.emit(op.matmul(x, _const(w.t().contiguous())))
    elif c.packed_layout:   # bias and all in the kernel, as the artifact's converter emits it
        return tvm_sparse.emit_conv(bb, _conv_call(bb, c, x))
    else:   # NCHW in and out around the NHWC conv, as between packed neighbours
        nhwc = bb.emit(op.permute_dims(x, [0, 2, 3, 1]))
        y = bb.emit(op.nn.conv2d(nhwc, _const(w.permute(2, 3, 1, 0).contiguous()), tuple(layer.stride),
                                 tuple(layer.padding), tuple(layer.dilation), layer.groups,
                                 data_layout="NHWC", kernel_layout="HWIO"))
        if layer.bias is not None:
            y = bb.emit(op.add(y, _bias(layer)))
        return bb.emit(op.permute_dims(y, [0, 3, 1, 2]))
    return y if layer.bias is None else bb.emit(op.add(y, _bias(layer)))


def _pair_calls(bb: relax.BlockBuilder, pw: Candidate, dw: Candidate,
                x: relax.Expr | None) -> tuple[tvm_sparse.ConvCall, tvm_sparse.ConvCall] | None:
    """(1x1 call, depthwise call) when the artifact fuses them, else None."""
    if not (isinstance(pw.layer, torch.nn.Conv2d) and isinstance(dw.layer, torch.nn.Conv2d)):
        return None
    if pw.matrix is None or not dw.packed_layout:
        return None
    p = _conv_call(bb, pw, x, pw.in_shape)
    d = _conv_call(bb, dw, None, (p.spec.batch, p.spec.out_channels, *p.spec.out_hw))
    return (p, d) if can_fuse_pointwise(p.spec, d.spec) else None


def _emit_pair(bb: relax.BlockBuilder, pair: FusedPair, x: relax.Var) -> relax.Expr:
    p, d = _pair_calls(bb, pair.pw, pair.dw, x)
    return tvm_sparse.emit_conv(bb, replace(d, x=p.x, producer=p))


def pair_candidates(cands: Sequence[Candidate], pairs: Sequence[tuple[str, str]]) -> list[FusedPair]:
    """The fused forms of each (1x1 layer, depthwise layer) pair that the artifact would fuse:
    the 1x1 conv's CSR candidate with each depthwise candidate that takes it (CSR or dense)."""
    by_name: dict[str, list[tuple[str, Candidate]]] = {}
    for c in cands:
        name, alt = c.key.split("\0")
        by_name.setdefault(name, []).append((alt, c))
    scratch = relax.BlockBuilder()
    out: list[FusedPair] = []
    for pw_name, dw_name in pairs:
        for pw_alt, pw in by_name.get(pw_name, []):
            for dw_alt, dw in by_name.get(dw_name, []):
                if _pair_calls(scratch, pw, dw, None) is not None:
                    out.append(FusedPair((pw_name, dw_name, f"{pw_alt}+{dw_alt}"), pw, dw, len(out)))
    return out


def candidate_module(cands: Sequence[Candidate | FusedPair]) -> tvm.IRModule:
    """One Relax function per candidate (`Candidate.function`), weights as constants."""
    bb = relax.BlockBuilder()
    for c in cands:
        x = relax.Var("x", relax.TensorType(c.input_shape(), "float32"))
        with bb.function(c.function, [x]):
            with bb.dataflow():
                if isinstance(c, FusedPair):
                    y = _emit_pair(bb, c, x)
                else:
                    y = _emit_dense(bb, c, x) if c.matrix is None else _emit_packed(bb, c, x)
                out = bb.emit_output(y)
            bb.emit_func_output(out)
    return bb.get()


def build_candidates(cands: Sequence[Candidate | FusedPair], target: tvm.target.Target) -> Any:
    """The relax executable of `candidate_module(cands)`, built like an artifact for `target`."""
    from rwdeploy.runtime.tvm_build import cpu_pipeline
    from rwdeploy.runtime.tvm_stack_tiles import register_tir_pipeline

    return tvm.compile(candidate_module(cands), target=target, relax_pipeline=cpu_pipeline(target, {}),
                       tir_pipeline=register_tir_pipeline())


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


# a candidate this much slower than its layer's fastest after one round cannot win: not timed again
CLEARLY_SLOWER = 1.5


def _group(c: Candidate | FusedPair) -> Any:
    """What a candidate competes with: its layer's other forms, or its pair's other combinations."""
    return c.key[:2] if isinstance(c, FusedPair) else c.key.split("\0")[0]


def contenders(first: dict[Any, float], groups: dict[Any, Any]) -> set[Any]:
    """The keys whose first sample is within `CLEARLY_SLOWER` of their group's fastest."""
    best: dict[Any, float] = {}
    for key, t in first.items():
        best[groups[key]] = min(best.get(groups[key], math.inf), t)
    return {key for key, t in first.items() if t <= CLEARLY_SLOWER * best[groups[key]]}


def time_candidates(cands: Sequence[Candidate | FusedPair], target: tvm.target.Target | None = None,
                    *, min_repeat_ms: int = 30, repeat: int = 5) -> dict[Any, dict[str, float]]:
    """Build every candidate (one build) and time each on this machine.

    The candidates are timed in rounds, one sample of each per round (TVM's time_evaluator, at
    least `min_repeat_ms` per sample), so that a shared machine's changing load affects all
    alike. After the first round, a candidate more than `CLEARLY_SLOWER` times slower than the
    fastest of its layer (or pair) is not timed again: a sparse layer's dense form is typically
    3-10x slower than its CSR one, and the rounds spent on such losers were most of
    `pack_sparse`'s time (MobileNetV2, 212 candidates: 64 s of timing, 33 s of building). The
    first round's samples are a third as long, and the survivors keep the call count it found.
    Returns key -> {"median_ms", "min_ms", "n"} over the samples taken (1 to `repeat`).
    """
    target = target or tvm_sparse.host_target()
    dev = tvm.cpu()
    vm = relax.VirtualMachine(build_candidates(cands, target), dev)
    rng = np.random.default_rng(0)
    timers, groups, functions = {}, {}, {}
    for c in cands:
        functions[c.key] = c.function
        x = tvm.runtime.tensor(rng.standard_normal(c.input_shape()).astype(np.float32), dev)
        # the first round only sorts out clear losers: a third of the sample time
        timers[c.key] = (vm.time_evaluator(c.function, dev, number=1, repeat=1,
                                           min_repeat_ms=max(1, min_repeat_ms // 3)), x)
        groups[c.key] = _group(c)
    samples: dict[Any, list[float]] = {key: [] for key in timers}
    for round_ in range(repeat):
        if round_ == 1:
            keep = contenders({key: res[0] for key, res in samples.items()}, groups)
            # the survivors keep the call count the first round found (time_evaluator's search for
            # it, repeated at every sample, took as long again as the sample)
            timers = {key: (vm.time_evaluator(functions[key], dev, repeat=1,
                                              number=max(1, math.ceil(min_repeat_ms / 1e3 / samples[key][0]))), x)
                      for key, (_, x) in timers.items() if key in keep}
        for key, (timer, x) in timers.items():
            samples[key].extend(timer(x).results)
    return {key: {"median_ms": float(np.median(res)) * 1e3, "min_ms": min(res) * 1e3, "n": len(res)}
            for key, res in samples.items()}


def measure_layer_formats(layers: Layers, target: tvm.target.Target | None = None,
                          pairs: Sequence[tuple[str, str]] = ()) -> dict[Any, dict[str, dict]]:
    """Time each layer's dense and packed forms on this machine, all in one TVM build.

    `layers`: (name, nn.Linear|nn.Conv2d, input shape, {format: SparseMatrix}). The
    alternatives are the kernels a TVM artifact can run for the layer: "dense" (the scheduled
    dense conv/matmul of the CPU pipeline) and each format. torch's eager dense layer
    (oneDNN/MKL) is timed too, as a reference outside the artifact ("ref:dense_torch").
    Returns name -> {alternative: {"median_ms", "min_ms", "n"}}.

    `pairs`: (1x1 layer, depthwise layer) names whose output feeds the other (through batch
    norm / activation only). Those the artifact fuses are timed fused too, in the same rounds:
    (1x1 name, depthwise name) -> {"csr+<depthwise alternative>": stats}.
    """
    from rwdeploy.runtime.latency import time_callable

    cands = candidates_of(layers)
    fused = pair_candidates(cands, pairs)
    times = time_candidates([*cands, *fused], target)
    out: dict[Any, dict[str, dict]] = by_layer(cands, times)
    for p in fused:
        out.setdefault(p.key[:2], {})[p.key[2]] = times[p.key]
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
