"""Pass: store sparse Linear / Conv2d layers as CSR or BSR where that is measured to be faster.

For each layer the candidates are dense, CSR and the block shapes that tile its weight
(`rwdeploy.sparse.BLOCK_SHAPES`). In mode "auto" every candidate is timed on the target by
a *timer* (a measurer from `rwdeploy.runtime`, injected so that this pass itself never
measures), as the kernels the target's compiled artifact runs (for `cpu`: rwdeploy's TIR
dense and sparse kernels in TVM). The fastest wins, and a packed format is kept only when it
beats dense by more than `noise` (relative), so packing never makes a layer slower. Timings a
timer reports under "ref:..." (torch's eager dense layer) are recorded for comparison only. Modes "csr" and
"bsr" force the format on every layer at least `min_sparsity` sparse (bsr: the block shape
that stores the fewest values). The record keeps each layer's sparsity, the choice, the
reason and every measured alternative.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from rwdeploy.errors import OptionError
from rwdeploy.passes.result import PassResult
from rwdeploy.sparse import BLOCK_SHAPES, CSR, CsrConv2d, CsrLinear, pack, sparsity
from rwdeploy.sparse.formats import SparseMatrix, fits_block

MODES = ("auto", "off", "csr", "bsr")
# name -> {alternative: {"median_ms": ...}}; alternatives are "dense", formats, and "ref:*"
Timer = Callable[[Sequence[tuple[str, nn.Module, Sequence[int], dict]]], dict[str, dict[str, dict]]]


@dataclass
class LayerPacking:
    name: str
    kind: str                       # "linear" | "conv2d"
    weight_shape: list[int]
    sparsity: float
    chosen: str                     # "dense" | "csr" | "bsr1x4" | ...
    reason: str
    dense_bytes: int
    packed_bytes: int               # == dense_bytes when kept dense
    measured_ms: dict[str, float] = field(default_factory=dict)   # alternative -> median ms
    reference_ms: dict[str, float] = field(default_factory=dict)  # outside the artifact
    measured_cost: dict[str, float] = field(default_factory=dict)  # what decided, when not ms
    cost_unit: str = "ms"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PackRecord:
    mode: str
    target: str
    measured_on: str | None
    batch: int | None
    noise: float
    layers: list[LayerPacking] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def packed(self) -> list[LayerPacking]:
        return [l for l in self.layers if l.chosen != "dense"]

    def bytes_saved(self) -> int:
        return sum(l.dense_bytes - l.packed_bytes for l in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "target": self.target, "measured_on": self.measured_on,
                "batch": self.batch, "noise": self.noise,
                "packed_layers": len(self.packed), "bytes_saved": self.bytes_saved(),
                "layers": [l.to_dict() for l in self.layers], "notes": list(self.notes)}


_FUNCTIONAL = {torch.nn.functional.linear, torch.nn.functional.conv2d, torch.ops.aten.linear.default,
               torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default}


def _packable(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return (isinstance(m, nn.Conv2d) and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def _candidates(layer: nn.Module) -> dict[str, SparseMatrix]:
    w = layer.weight.detach()
    w2 = w.reshape(w.shape[0], -1)
    out = {"csr": pack(w2, CSR)}
    rows_per_group = w.shape[0] // (layer.groups if isinstance(layer, nn.Conv2d) else 1)
    for br, bc in BLOCK_SHAPES:
        if isinstance(layer, nn.Conv2d) and (bc != 1 or rows_per_group % br):
            continue   # conv kernels block output channels only, within one group
        if fits_block(tuple(w2.shape), (br, bc)):
            m = pack(w2, (br, bc))
            out[m.format] = m
    return out


def _packed_module(layer: nn.Module, m: SparseMatrix) -> nn.Module:
    if isinstance(layer, nn.Linear):
        return CsrLinear(m, layer.bias)
    return CsrConv2d(m, tuple(layer.weight.shape), layer.bias, layer.stride, layer.padding,
                     layer.dilation, layer.groups)


def _replace(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, new)


def _cost(v: dict) -> float:
    """What an alternative is compared by: a timer's "cost" (e.g. instructions), else its median ms."""
    return v.get("cost", v["median_ms"])


def _choose(measured: dict[str, dict], noise: float) -> tuple[str, str]:
    """(chosen format, reason) from measured costs; never a format slower than another."""
    alts = {alt: v for alt, v in measured.items() if not alt.startswith("ref:")}
    med = {alt: _cost(v) for alt, v in alts.items()}
    unit = next(iter(alts.values())).get("unit", "ms")
    best = min(med, key=med.get)
    if best == "dense":
        return "dense", f"dense fastest ({med['dense']:.4g} {unit})"
    if med[best] < med["dense"] * (1 - noise):
        return best, f"{med['dense'] / med[best]:.2f}x faster than dense ({unit})"
    return "dense", f"{best} within noise of dense ({med[best]:.4g} vs {med['dense']:.4g} {unit})"


def default_timer(target: str) -> tuple[Timer, str]:
    """The measurer for a target name and a note on where it measures.

    arm-family targets measure on the arm device (`runtime.arm_layer_timer`: instruction counts
    on the emulated aarch64 device, the host only as a stated fallback); others on the host.
    """
    from rwdeploy.runtime import tvm_sparse
    from rwdeploy.runtime.targets import TARGETS

    if target in TARGETS and TARGETS[target].family == "arm":
        from rwdeploy.runtime.arm_layer_timer import arm_layer_timer

        timer = arm_layer_timer(target)
        return timer, timer.where
    cpu = tvm_sparse.host_target()
    where = f"host {cpu.attrs.get('mcpu', 'cpu')} via TVM, {tvm_sparse.threads()} threads"
    if target != "cpu":
        where += f" (proxy: target {target!r} is not measurable here; pass timer= to measure it)"
    return (lambda layers: tvm_sparse.measure_layer_formats(layers, cpu)), where


def pack_sparse(gm: fx.GraphModule, example_input: torch.Tensor, *, mode: str = "auto",
                target: str = "cpu", min_sparsity: float = 0.5, noise: float = 0.05,
                timer: Timer | None = None) -> PassResult[PackRecord]:
    """Replace sparse nn.Linear / nn.Conv2d submodules by CsrLinear / CsrConv2d (see module doc)."""
    if mode not in MODES:
        raise OptionError(f"--sparse {mode!r} is not a sparse packing mode",
                          hint=f"use one of {', '.join(MODES)}")
    new = copy.deepcopy(gm)
    record = PackRecord(mode, target, None, int(example_input.shape[0]), noise)
    if mode == "off":
        return PassResult(new, record)
    ShapeProp(new).propagate(example_input)
    sites: list[tuple[str, nn.Module, list[int]]] = []
    seen: set[str] = set()
    for node in new.graph.nodes:
        if node.op != "call_module" or node.target in seen:
            continue
        layer = new.get_submodule(node.target)
        meta = node.args[0].meta.get("tensor_meta") if node.args and isinstance(node.args[0], fx.Node) else None
        if _packable(layer) and meta is not None:
            seen.add(node.target)
            sites.append((node.target, layer, list(meta.shape)))

    functional = [n.name for n in new.graph.nodes if n.op == "call_function" and n.target in _FUNCTIONAL]
    if functional:   # a torch.export-style graph: weights are not submodules we can swap
        record.notes.append(f"not packed (functional conv/linear calls, not modules): {', '.join(functional)}")
    pending = []
    for name, layer, shape in sites:
        w = layer.weight.detach()
        entry = LayerPacking(name, "linear" if isinstance(layer, nn.Linear) else "conv2d",
                             list(w.shape), sparsity(w), "dense", "", w.numel() * 4, w.numel() * 4)
        record.layers.append(entry)
        if entry.sparsity < min_sparsity:
            entry.reason = f"sparsity {entry.sparsity:.3f} below min_sparsity {min_sparsity}"
            continue
        pending.append((entry, layer, shape, _candidates(layer)))

    if mode == "auto" and pending:
        if timer is None:
            timer, record.measured_on = default_timer(target)
        else:
            record.measured_on = getattr(timer, "where", "caller-supplied timer")
        measured = timer([(e.name, layer, shape, cands) for e, layer, shape, cands in pending])
        for entry, layer, _, cands in pending:
            times = measured[entry.name]
            entry.measured_ms = {alt: round(v["median_ms"], 6) for alt, v in times.items()
                                 if not alt.startswith("ref:")}
            entry.reference_ms = {alt[4:]: round(v["median_ms"], 6) for alt, v in times.items()
                                  if alt.startswith("ref:")}
            costs = {alt: v for alt, v in times.items() if not alt.startswith("ref:") and "cost" in v}
            if costs:
                entry.measured_cost = {alt: round(v["cost"], 6) for alt, v in costs.items()}
                entry.cost_unit = next(iter(costs.values())).get("unit", "ms")
            entry.chosen, entry.reason = _choose(times, noise)
    else:
        for entry, _, _, cands in pending:
            if mode == "csr":
                entry.chosen = "csr"
            else:
                blocks = {f: m for f, m in cands.items() if f != "csr"}
                entry.chosen = min(blocks, key=lambda f: blocks[f].nnz) if blocks else "csr"
            entry.reason = f"forced by mode {mode!r}"

    for entry, layer, _, cands in pending:
        if entry.chosen != "dense":
            m = cands[entry.chosen]
            entry.packed_bytes = m.nbytes()
            _replace(new, entry.name, _packed_module(layer, m))
    new.recompile()
    return PassResult(new, record)
