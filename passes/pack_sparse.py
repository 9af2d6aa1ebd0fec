"""Pass: store sparse Linear / Conv2d layers as CSR or BSR where that is measured to be faster.

For each layer the candidates are dense, CSR and the block shapes that tile its weight
(`rwdeploy.sparse.BLOCK_SHAPES`). In mode "auto" every candidate is timed by the measurer the
caller puts in the PassContext (the compile pipeline gives `rwdeploy.sparse.timing.HostLayerTimer`:
the kernels the target's compiled artifact runs, for `cpu` rwdeploy's TIR dense and sparse kernels
in TVM); this pass itself never measures. The fastest wins, and a packed format is kept only when
it beats dense by more than `noise` (relative), so packing never makes a layer slower. Timings a
timer reports under "ref:..." (torch's eager dense layer) are recorded for comparison only. Modes
"csr" and "bsr" force the format on every layer at least `min_sparsity` sparse (bsr: the block
shape that stores the fewest values). The record keeps each layer's sparsity, the choice, the
reason and every measured alternative. Layers are read through their LayerView (`passes/ops`).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from rwdeploy.errors import OptionError
from rwdeploy.passes.ops import LayerView, layer_view
from rwdeploy.passes.ops.conv import ConvView
from rwdeploy.passes.ops.linear import LinearView
from rwdeploy.passes.protocol import PassContext, PassResult
from rwdeploy.sparse import BLOCK_SHAPES, CSR, CsrConv2d, CsrLinear, pack, sparsity
from rwdeploy.sparse.formats import SparseMatrix, fits_block

MODES = ("auto", "off", "csr", "bsr")
# (name, layer, input shape, {format: matrix}) per layer -> name -> {alternative: {"median_ms": ...}};
# alternatives are "dense", formats, and "ref:*". A timer may say where it measured (`.where`).
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


def _packable(view: LayerView | None) -> bool:
    if isinstance(view, LinearView):
        return True
    return (isinstance(view, ConvView) and view.spatial == 2 and not view.transposed
            and view.setting("padding_mode", "zeros") == "zeros" and not isinstance(view.setting("padding"), str))


def _candidates(view: LayerView) -> dict[str, SparseMatrix]:
    w = view.weight.detach()
    w2 = w.reshape(w.shape[0], -1)
    out = {"csr": pack(w2, CSR)}
    conv = isinstance(view, ConvView)
    rows_per_group = w.shape[0] // (view.groups if conv else 1)
    for br, bc in BLOCK_SHAPES:
        if conv and (bc != 1 or rows_per_group % br):
            continue   # conv kernels block output channels only, within one group
        if fits_block(tuple(w2.shape), (br, bc)):
            m = pack(w2, (br, bc))
            out[m.format] = m
    return out


def _packed_module(view: LayerView, m: SparseMatrix) -> nn.Module:
    if isinstance(view, LinearView):
        return CsrLinear(m, view.bias)
    return CsrConv2d(m, tuple(view.weight.shape), view.bias, view.setting("stride"), view.setting("padding"),
                     view.setting("dilation"), view.groups)


def _replace(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, new)


def _choose(measured: dict[str, dict], noise: float) -> tuple[str, str]:
    """(chosen format, reason) from measured medians; never a format slower than another."""
    med = {alt: v["median_ms"] for alt, v in measured.items() if not alt.startswith("ref:")}
    best = min(med, key=med.get)
    if best == "dense":
        return "dense", f"dense fastest ({med['dense']:.4g} ms)"
    if med[best] < med["dense"] * (1 - noise):
        return best, f"{med['dense'] / med[best]:.2f}x faster than dense"
    return "dense", f"{best} within noise of dense ({med[best]:.4g} vs {med['dense']:.4g} ms)"


@dataclass
class PackSparse:
    """Replace sparse nn.Linear / nn.Conv2d submodules by CsrLinear / CsrConv2d (see module doc)."""

    mode: str = "auto"
    target: str = "cpu"
    min_sparsity: float = 0.5
    noise: float = 0.05
    name: ClassVar[str] = "pack_sparse"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult[PackRecord]:
        if self.mode not in MODES:
            raise OptionError(f"--sparse {self.mode!r} is not a sparse packing mode",
                              hint=f"use one of {', '.join(MODES)}")
        new = copy.deepcopy(gm)
        record = PackRecord(self.mode, self.target, None, int(ctx.example_input.shape[0]), self.noise)
        if self.mode == "off":
            return PassResult(new, record)
        ShapeProp(new).propagate(ctx.example_input)
        pending, seen = [], set()
        for node in new.graph.nodes:
            view = layer_view(new, node)
            meta = node.args[0].meta.get("tensor_meta") if node.args and isinstance(node.args[0], fx.Node) else None
            if node.op == "call_function" and _packable(view):  # weights are not submodules we can swap
                record.notes.append(node.name)
            if node.op != "call_module" or node.target in seen or not _packable(view) or meta is None:
                continue
            seen.add(node.target)
            w = view.weight.detach()
            entry = LayerPacking(node.target, "linear" if isinstance(view, LinearView) else "conv2d",
                                 list(w.shape), sparsity(w), "dense", "", w.numel() * 4, w.numel() * 4)
            record.layers.append(entry)
            if entry.sparsity < self.min_sparsity:
                entry.reason = f"sparsity {entry.sparsity:.3f} below min_sparsity {self.min_sparsity}"
            else:
                pending.append((entry, view, list(meta.shape), _candidates(view)))
        if record.notes:
            record.notes = [f"not packed (functional conv/linear calls, not modules): {', '.join(record.notes)}"]
        self._choose_formats(new, pending, ctx.measurer, record)
        for entry, view, _, cands in pending:
            if entry.chosen != "dense":
                m = cands[entry.chosen]
                entry.packed_bytes = m.nbytes()
                _replace(new, entry.name, _packed_module(view, m))
        new.recompile()
        return PassResult(new, record)

    def _choose_formats(self, gm: fx.GraphModule, pending: list, timer: Timer | None, record: PackRecord) -> None:
        if self.mode == "auto" and pending:
            if timer is None:
                raise ValueError("pack_sparse mode 'auto' chooses by measurement: put a measurer in the "
                                 "PassContext (e.g. rwdeploy.sparse.timing.HostLayerTimer(target))")
            measured = timer([(e.name, gm.get_submodule(e.name), shape, cands) for e, _, shape, cands in pending])
            record.measured_on = getattr(timer, "where", None) or "caller-supplied timer"
            for entry, _, _, cands in pending:
                times = measured[entry.name]
                entry.measured_ms = {alt: round(v["median_ms"], 6) for alt, v in times.items()
                                     if not alt.startswith("ref:")}
                entry.reference_ms = {alt[4:]: round(v["median_ms"], 6) for alt, v in times.items()
                                      if alt.startswith("ref:")}
                entry.chosen, entry.reason = _choose(times, self.noise)
            return
        for entry, _, _, cands in pending:
            if self.mode == "csr":
                entry.chosen = "csr"
            else:
                blocks = {f: m for f, m in cands.items() if f != "csr"}
                entry.chosen = min(blocks, key=lambda f: blocks[f].nnz) if blocks else "csr"
            entry.reason = f"forced by mode {self.mode!r}"


def pack_sparse(gm: fx.GraphModule, example_input: torch.Tensor, *, mode: str = "auto", target: str = "cpu",
                min_sparsity: float = 0.5, noise: float = 0.05, timer: Timer | None = None) -> PassResult[PackRecord]:
    """`PackSparse(...)` on a context holding `example_input` and `timer` (the measurer)."""
    return PackSparse(mode, target, min_sparsity, noise)(gm, PassContext(example_input, measurer=timer))
