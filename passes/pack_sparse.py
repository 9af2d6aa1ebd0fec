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

A 1x1 conv whose output feeds only a depthwise conv (through batch norm and an activation) runs
inside the depthwise kernel when both are packed alike (CSR); a timer that can (`times_fused_pairs`)
times such pairs fused too, and the pair takes the fused formats when that beats the two layers'
own choices (see `_choose_pair`).

Both forms a layer takes in a graph are packed alike: a submodule call (`self.fc(x)`) has the
submodule swapped; a torch function / ATen call reading get_attr tensors (`F.linear(x, self.w)`,
`aten.conv2d(x, conv_weight, ...)` in a loaded `.pt2` program) is rewritten to a call of the same
packed module (CsrLinear / CsrConv2d, whose forward is the `rwdeploy::sparse_*` op) and its dense
tensors are dropped. The packed module takes the path of the module that held the weight when
that module held nothing else (`fc1.weight` -> `fc1`, as a module graph would be packed), else a
new path beside the weight (`w` -> `w_packed`). A call whose weight another node also reads is
left dense and named in the notes.
"""
from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from rwdeploy.errors import OptionError
from rwdeploy.passes.ops import LayerView, layer_view
from rwdeploy.passes.ops.common import base_name
from rwdeploy.passes.ops.conv import ConvView
from rwdeploy.passes.ops.linear import LinearView
from rwdeploy.passes.protocol import PassContext, PassResult
from rwdeploy.sparse import BLOCK_SHAPES, CSR, CsrConv2d, CsrLinear, pack, sparsity
from rwdeploy.sparse.formats import SparseMatrix, fits_block

MODES = ("auto", "off", "csr", "bsr")
# (name, layer, input shape, {format: matrix}) per layer -> name -> {alternative: {"median_ms": ...}};
# alternatives are "dense", formats, and "ref:*". A timer may say where it measured (`.where`). One
# with `times_fused_pairs` is called with `pairs=[(1x1 name, depthwise name)]` too and adds
# (1x1 name, depthwise name) -> {"<1x1 format>+<depthwise format>": stats} for the pairs it fuses.
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
    fused_with: str | None = None   # the other layer of a fused 1x1 -> depthwise pair
    fused_ms: dict[str, float] = field(default_factory=dict)  # "<1x1 fmt>+<depthwise fmt>" -> ms (1x1 layer)
    form: str = "module"            # "module" (a submodule call) | "call" (a function / ATen call)
    op: str = ""                    # the module class, or the called function / ATen overload
    module: str | None = None       # where the packed module is (None when kept dense)

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


def _settings_known(view: ConvView) -> bool:
    """A call's conv settings are constants (not values computed in the graph)."""
    values = [view.setting(k) for k in ("stride", "padding", "dilation", "groups")]
    flat = [v for x in values for v in (x if isinstance(x, (list, tuple)) else [x])]
    return all(v is None or isinstance(v, int) for v in flat)


def _packable(view: LayerView | None) -> bool:
    if isinstance(view, LinearView):
        return view.weight.dim() == 2
    return (isinstance(view, ConvView) and view.spatial == 2 and not view.transposed and _settings_known(view)
            and view.setting("padding_mode", "zeros") == "zeros" and not isinstance(view.setting("padding"), str))


def _pair(value: Any, default: int) -> tuple[int, int]:
    """A conv setting as (h, w): a module's tuple, or a call's int / [v] / [h, w] / absent."""
    if value is None:
        return (default, default)
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[-1]))


def _conv_settings(view: ConvView) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]:
    """(stride, padding, dilation, groups) of a 2-D convolution in either form."""
    return (_pair(view.setting("stride"), 1), _pair(view.setting("padding"), 0),
            _pair(view.setting("dilation"), 1), int(view.setting("groups") or 1))


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
    return CsrConv2d(m, tuple(view.weight.shape), view.bias, *_conv_settings(view))


def _dense_layer(view: LayerView) -> nn.Module:
    """The layer as the nn.Linear / nn.Conv2d a timer measures: a module call's own module, a
    call's tensors in a new module (sharing them, nothing copied)."""
    if view.node is None or view.node.op == "call_module":
        return view.form.module
    w = view.weight.detach()
    if isinstance(view, LinearView):
        layer = nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=view.bias is not None)
    else:
        stride, padding, dilation, groups = _conv_settings(view)
        layer = nn.utils.skip_init(nn.Conv2d, w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride,
                                   padding, dilation, groups, bias=view.bias is not None)
    layer.weight = nn.Parameter(w, requires_grad=False)
    if view.bias is not None:
        layer.bias = nn.Parameter(view.bias.detach(), requires_grad=False)
    return layer.eval()


def _replace(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, new)


def _cost(v: dict) -> float:
    """What an alternative is compared by: a timer's "cost" (e.g. instructions), else its median ms."""
    return v.get("cost", v["median_ms"])


def _attr_reads(gm: fx.GraphModule) -> Counter:
    """How many node inputs read each get_attr target (a tensor read by two calls counts 2)."""
    return Counter(n.target for n in gm.graph.nodes if n.op == "get_attr" for _ in n.users)


def _call_name(node: fx.Node) -> str:
    """`aten.conv2d.default`, or `conv2d (function)` for a torch function."""
    target = node.target
    return str(target) if isinstance(target, torch._ops.OpOverload) else f"{getattr(target, '__name__', target)} (function)"


def _call_layer_place(gm: fx.GraphModule, view: LayerView) -> tuple[str, str]:
    """(name, packed path) of a call's layer: the module holding its weight, when that module
    holds only the layer's tensors and no node reads anything else of it (`fc1.weight` -> fc1,
    fc1); else its weight, packed beside it (`head.w` -> head.w, head.w_packed)."""
    key = view.tensors["weight"]
    owner, _, attr = key.rpartition(".")
    if owner:
        keys = set(view.tensors.values())
        holder = gm.get_submodule(owner)
        others = [n for n in gm.graph.nodes if n.op in ("get_attr", "call_module")
                  and (n.target == owner or n.target.startswith(owner + ".")) and n.target not in keys]
        held = {f"{owner}.{k}" for k, _ in (*holder.named_parameters(), *holder.named_buffers())}
        if not others and held <= keys and not any(holder.children()):
            return owner, owner
    path, i = f"{key}_packed", 1
    while _has_attr(gm, path):
        path, i = f"{key}_packed{i}", i + 1
    return key, path


def _has_attr(gm: nn.Module, path: str) -> bool:
    obj: Any = gm
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _swap_call(gm: fx.GraphModule, view: LayerView, path: str, packed: nn.Module) -> None:
    """Rewrite a function / ATen layer call to a call of `packed` at `path`; drop its dense tensors."""
    node, graph = view.node, gm.graph
    reads = [a for a in node.all_input_nodes if a.op == "get_attr" and a.target in set(view.tensors.values())]
    for key in view.tensors.values():
        owner, _, attr = key.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, attr)
    if _has_attr(gm, path):
        _replace(gm, path, packed)   # the weight's holder, now empty
    else:
        gm.add_submodule(path, packed)
    with graph.inserting_before(node):
        call = graph.call_module(path, (view.input,))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    for a in reads:
        if not a.users:
            graph.erase_node(a)


# what may sit between a 1x1 conv and the depthwise conv it feeds for the artifact to fuse them:
# the epilogues its kernels take (`runtime.tvm_sparse`: batch norm, then one activation)
_PASS_THROUGH_MODULES = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.SiLU)
_PASS_THROUGH_FUNCTIONS = (F.batch_norm, F.relu, F.relu6, F.hardtanh, F.hardswish, F.silu, torch.relu)
_PASS_THROUGH_METHODS = ("relu", "relu_")
_PASS_THROUGH_ATEN = ("batch_norm", "_native_batch_norm_legit_no_training", "relu", "relu_", "relu6", "relu6_",
                      "hardtanh", "hardtanh_", "hardswish", "hardswish_", "silu", "silu_")


def _passes_through(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _PASS_THROUGH_MODULES)
    if node.op == "call_method":
        return node.target in _PASS_THROUGH_METHODS
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:   # output 0 of a decomposed batch norm
        return node.args[1] == 0 and isinstance(node.args[0], fx.Node) and _passes_through(gm, node.args[0])
    if isinstance(node.target, torch._ops.OpOverload):
        return base_name(node) in _PASS_THROUGH_ATEN
    return node.target in _PASS_THROUGH_FUNCTIONS


def _fused_pairs(gm: fx.GraphModule, pending: list) -> list[tuple[str, str]]:
    """(1x1 layer, depthwise layer) names of pending convs where the first's output reaches only
    the second, through batch norm / activation nodes with one user each."""
    by_node = {view.node: (entry, view) for entry, view, _, _ in pending}
    pairs = []
    for entry, view, _, _ in pending:
        w = view.weight
        if not isinstance(view, ConvView) or w.dim() != 4 or tuple(w.shape[2:]) != (1, 1):
            continue
        node = view.node
        while len(node.users) == 1:
            node = next(iter(node.users))
            if node in by_node:
                other, dw = by_node[node]
                if isinstance(dw, ConvView) and dw.weight.dim() == 4 and dw.weight.shape[1] == 1:
                    pairs.append((entry.name, other.name))
                break
            if not _passes_through(gm, node):
                break
    return pairs


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


def _choose_pair(pw: LayerPacking, dw: LayerPacking, pw_times: dict, dw_times: dict, fused: dict,
                 noise: float) -> None:
    """The formats of a 1x1 -> depthwise pair. The layers' own choices cost what the artifact
    will run: their fused time when they fuse (CSR 1x1, CSR or dense depthwise), else their two
    times summed. The cheapest fused combination replaces them when it is faster by more than
    `noise`; the pair then never takes a combination measured slower than another."""
    pw.fused_ms = {combo: round(v["median_ms"], 6) for combo, v in fused.items()}
    unit = next(iter(fused.values())).get("unit", "ms")
    was = f"{pw.chosen}+{dw.chosen}"
    own = _cost(fused[was]) if was in fused else _cost(pw_times[pw.chosen]) + _cost(dw_times[dw.chosen])
    best = min(fused, key=lambda combo: _cost(fused[combo]))
    cost = _cost(fused[best])
    if cost < own * (1 - noise):
        pw.chosen, dw.chosen = best.split("+")
        pw.reason = dw.reason = (f"{pw.name} fused into {dw.name} as {best}: {cost:.4g} {unit} for both against "
                                 f"{own:.4g} as {was}{' fused' if was in fused else ''} ({own / cost:.2f}x)")
    elif was in fused:
        pw.reason, dw.reason = (f"{r}; runs fused with {other.name} ({own:.4g} {unit} for both as {was})"
                                for r, other in ((pw.reason, dw), (dw.reason, pw)))
    else:
        return
    pw.fused_with, dw.fused_with = dw.name, pw.name


@dataclass
class PackSparse:
    """Replace sparse linear / 2-D conv layers, module or call, by CsrLinear / CsrConv2d (see module doc)."""

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
        pending, seen, shared, places = [], set(), [], {}
        reads = _attr_reads(new)
        for node in new.graph.nodes:
            view = layer_view(new, node) if node.op in ("call_module", "call_function") else None
            inp = view.input if view is not None else None
            meta = inp.meta.get("tensor_meta") if isinstance(inp, fx.Node) else None
            if not _packable(view) or meta is None or (isinstance(view, ConvView) and len(meta.shape) != 4):
                continue   # (the packed conv takes batched NCHW input only)
            if node.op == "call_module":
                if node.target in seen:
                    continue
                seen.add(node.target)
                name, op = node.target, type(view.form.module).__name__
                places[name] = name
            elif any(reads[key] != 1 for key in view.tensors.values()):
                shared.append(node.name)   # packing it would keep the dense tensor for the other reader
                continue
            else:
                name, path = _call_layer_place(new, view)
                places[name], op = path, _call_name(node)
            w = view.weight.detach()
            entry = LayerPacking(name, "linear" if isinstance(view, LinearView) else "conv2d",
                                 list(w.shape), sparsity(w), "dense", "", w.numel() * 4, w.numel() * 4,
                                 form="module" if node.op == "call_module" else "call", op=op)
            record.layers.append(entry)
            if entry.sparsity < self.min_sparsity:
                entry.reason = f"sparsity {entry.sparsity:.3f} below min_sparsity {self.min_sparsity}"
            else:
                pending.append((entry, view, list(meta.shape), _candidates(view)))
        if shared:
            record.notes.append(f"not packed (weight also read by other nodes): {', '.join(shared)}")
        self._choose_formats(new, pending, ctx.measurer, record)
        for entry, view, _, cands in pending:
            if entry.chosen != "dense":
                m = cands[entry.chosen]
                entry.packed_bytes, entry.module = m.nbytes(), places[entry.name]
                if view.node.op == "call_module":
                    _replace(new, entry.module, _packed_module(view, m))
                else:
                    _swap_call(new, view, entry.module, _packed_module(view, m))
        new.recompile()
        return PassResult(new, record)

    def _choose_formats(self, gm: fx.GraphModule, pending: list, timer: Timer | None, record: PackRecord) -> None:
        if self.mode == "auto" and pending:
            if timer is None:
                raise ValueError("pack_sparse mode 'auto' chooses by measurement: put a measurer in the "
                                 "PassContext (e.g. rwdeploy.sparse.timing.HostLayerTimer(target))")
            layers = [(e.name, _dense_layer(v), shape, cands) for e, v, shape, cands in pending]
            pairs = _fused_pairs(gm, pending) if getattr(timer, "times_fused_pairs", False) else []
            measured = timer(layers, pairs=pairs) if pairs else timer(layers)
            record.measured_on = getattr(timer, "where", None) or "caller-supplied timer"
            for entry, _, _, cands in pending:
                times = measured[entry.name]
                entry.measured_ms = {alt: round(v["median_ms"], 6) for alt, v in times.items()
                                     if not alt.startswith("ref:")}
                entry.reference_ms = {alt[4:]: round(v["median_ms"], 6) for alt, v in times.items()
                                      if alt.startswith("ref:")}
                costs = {alt: v for alt, v in times.items() if not alt.startswith("ref:") and "cost" in v}
                if costs:   # a timer that decides by something else than ms (e.g. instructions)
                    entry.measured_cost = {alt: round(v["cost"], 6) for alt, v in costs.items()}
                    entry.cost_unit = next(iter(costs.values())).get("unit", "ms")
                entry.chosen, entry.reason = _choose(times, self.noise)
            entries = {entry.name: entry for entry, *_ in pending}
            for pw, dw in pairs:
                if measured.get((pw, dw)):
                    _choose_pair(entries[pw], entries[dw], measured[pw], measured[dw], measured[(pw, dw)], self.noise)
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
