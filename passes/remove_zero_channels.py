"""Pass: physically remove zero channel groups, folding the constants they still carry.

A removed channel whose producing weights are zero still carries a constant (conv bias, the
BatchNorm shift, passed through any elementwise function, pooled, ...). Its consumers read
that constant: the pass runs each consumer on exactly the removed channels' values (which do
not depend on the input) and adds the result back - into the consumer's bias when it is the
same at every position, otherwise as a precomputed constant map (a buffer added right after
the consumer; zero padding and pooling make contributions position-dependent), or, where a
channel kept for alignment holds a constant of the same pattern, into that channel's weights
(`channel_carriers`: no map at all). The slim model computes the same function as the original
for inputs of the example input's shape.
"""
from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, ClassVar

import torch
from torch import fx, nn

from rwdeploy.errors import OptionError
from rwdeploy.passes.channel_alignment import (MAX_MEASURED_GROUPS, MIN_MEASURED_MACS, AlignmentRecord, finish,
                                               parse_align, plan_alignment)
from rwdeploy.passes.channel_carriers import CarrierFold, carrier_fold, fold_into_carrier
from rwdeploy.passes.channel_constants import CONV_FUNCTIONS, BorderKernel, border_kernel
from rwdeploy.passes.channel_folding import fold_computed_weights
from rwdeploy.passes.channel_groups import ChannelAnalysis, analyze_channel_groups
from rwdeploy.passes.channel_selection import Selection, candidates, select
from rwdeploy.passes.channel_state import TensorMeta, along, varying_dims
from rwdeploy.passes.ops import SPECS, LayerView
from rwdeploy.passes.ops.common import tensor_arg
from rwdeploy.passes.ops.graph import resize_constant, resizes
from rwdeploy.passes.ops.shape import freeze_size_read
from rwdeploy.passes.ops.layer import get_tensor, keep, replace_tensor
from rwdeploy.passes.protocol import PassContext, PassResult


@dataclass
class LayerChange:
    name: str
    type: str
    before: dict[str, list[int]]
    after: dict[str, list[int]]
    folded: str | None = None  # "bias", "border kernel", "constant map" or "carrier" (`channel_carriers`)
    folded_max_abs: float | None = None  # largest folded value: how much the constants mattered

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "before": self.before, "after": self.after,
                "folded": self.folded, "folded_max_abs": self.folded_max_abs}


@dataclass
class RemovalRecord:
    layers: list[LayerChange]
    removed_groups: list[dict[str, Any]]
    pinned_groups: list[dict[str, Any]]
    params_before: int
    params_after: int
    # for verification: node name -> {dim: kept indices} of values that lost channels
    kept_indices: dict[str, dict[int, list[int]]] = field(default_factory=dict, repr=False)
    # node name -> the node that now carries its value (a constant map added after it)
    aliases: dict[str, str] = field(default_factory=dict, repr=False)
    # layer node -> the parameter its weight, computed from parameters in forward(), became
    folded_weights: dict[str, str] = field(default_factory=dict)
    alignment: AlignmentRecord | None = None  # removable channels kept for aligned counts (align != "off")
    # removable channels kept because their constants needed dense maps larger than what
    # removing them saved (the slim model never stores more than the original)
    kept_for_size: int = 0
    # removed classes whose constants were folded as dense constant maps
    map_feeders: set[int] = field(default_factory=set, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "layers": [layer.to_dict() for layer in self.layers],
            "removed_groups": self.removed_groups,
            "pinned_groups": self.pinned_groups,
            "folded_weights": self.folded_weights,
            **({"alignment": self.alignment.to_dict()} if self.alignment is not None else {}),
            **({"kept_for_size": self.kept_for_size} if self.kept_for_size else {}),
        }


def apply_masks(gm: fx.GraphModule, masks: dict[str, torch.Tensor]) -> None:
    """Zero what the masks prune (False = pruned) in `gm`'s parameters, in place."""
    params = dict(gm.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise OptionError(f"mask names parameter {name!r}, which the model does not have",
                              hint="masks must be keyed by the model's state_dict names")
        p = params[name]
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != p.shape:
            raise OptionError(f"mask for {name} has shape {tuple(mask.shape)}, parameter has "
                              f"{tuple(p.shape)}", hint="use the masks saved with this checkpoint")
        with torch.no_grad():
            p.mul_(mask.to(p.dtype))


@dataclass
class RemoveZeroChannels:
    """The pass (see the module doc); `analysis` of the input graph is reused when given.
    Reads `example_input`, `masks` and `strict` from the context, and with `align="auto"` the
    measurer (`passes/channel_alignment.py`). `align` ("off" | "auto" | N) keeps removable zero
    channels back so that kept counts are multiples of N (auto: of `lanes`, where measured faster)."""

    analysis: ChannelAnalysis | None = None
    align: str | int = "off"
    lanes: int = 8  # float32 vector lanes of the target (align="auto")
    max_measured: int = MAX_MEASURED_GROUPS
    min_macs: int = MIN_MEASURED_MACS
    name: ClassVar[str] = "remove_zero_channels"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult[RemovalRecord]:
        work = copy.deepcopy(gm)
        analysis = self.analysis
        if ctx.masks:
            apply_masks(work, ctx.masks)
        if analysis is None or ctx.masks:
            analysis = analyze_channel_groups(work, ctx.example_input, strict=ctx.strict)
        params_before = sum(p.numel() for p in work.parameters())
        if analysis.folded_weights:  # the analysis read these weights folded: fold them here too
            folded = fold_computed_weights(work, ctx.example_input)
            if folded != analysis.folded_weights:
                raise ValueError("the channel analysis was made for another graph (its folded weights differ)")
        align = parse_align(self.align)
        plan = None if align == "off" else partial(plan_alignment, align=align, lanes=self.lanes,
                                                   measurer=ctx.measurer, max_measured=self.max_measured,
                                                   min_macs=self.min_macs)
        pristine, stored_before = copy.deepcopy(work), _stored_bytes(work)
        record = _remove(work, ctx.example_input, analysis, params_before, plan)
        keep_back: set[int] = set()
        # Dense constant maps grow with the input's spatial size (MobileViT at 256): where they
        # make the slim model store more than the original, the channels that need them stay.
        while record.map_feeders - keep_back and _stored_bytes(work) > stored_before:
            keep_back |= record.map_feeders
            work = copy.deepcopy(pristine)
            record = _remove(work, ctx.example_input, analysis, params_before, plan, keep_back=keep_back)
            record.kept_for_size = len(keep_back)
        return PassResult(work, record)


def _stored_bytes(gm: nn.Module) -> int:
    """Bytes of every tensor the module stores (parameters and buffers, constant maps included)."""
    return sum(t.numel() * t.element_size() for t in gm.state_dict().values())


def remove_zero_channels(gm: fx.GraphModule, example_input: Any, *, analysis: ChannelAnalysis | None = None,
                         masks: dict[str, torch.Tensor] | None = None, align: str | int = "off", lanes: int = 8,
                         measurer: Any = None) -> PassResult[RemovalRecord]:
    """A new, smaller GraphModule computing the same function; `gm` is not modified.
    `RemoveZeroChannels(analysis, align, lanes)` on a context holding `example_input`, `masks`
    and `measurer`."""
    return RemoveZeroChannels(analysis, align, lanes)(gm, PassContext(example_input, masks=masks, measurer=measurer))


def _remove(work: fx.GraphModule, example_input: Any, analysis: ChannelAnalysis,
            params_before: int, plan: Callable[..., tuple[set[int], AlignmentRecord]] | None = None,
            keep_back: set[int] = frozenset()) -> RemovalRecord:
    """Remove the zero channels of `work` in place; the record of what changed (`params_before`:
    of the model as given, before computed weights were folded). `plan(analysis, sel, views)`:
    the classes alignment keeps back (`channel_alignment.plan_alignment`); `keep_back`: classes
    kept whatever they hold."""
    found = candidates(analysis, work.state_dict())
    sel = select(analysis, set(found) - set(keep_back))
    storage = {key: t.data_ptr() for key, t in work.state_dict(keep_vars=True).items()}

    views = {n.name: view for n in work.graph.nodes if (view := _layer(work, n, analysis)) is not None}
    alignment = None
    if plan is not None:  # keeping zero channels is exact: the selection only shrinks
        keep_back, alignment = plan(analysis, sel, views)
        if keep_back:
            sel = select(analysis, sel.removed - keep_back)
    aligned_sel = sel
    sites = [views[name] for name in analysis.fold_sites if name in views]
    while True:
        captured = _capture_inputs(work, example_input, sites, sel)
        folds = {v.node.name: _fold(v, captured[v.node.name], sel, analysis.values) for v in sites
                 if v.node.name in captured}
        # a layer that can only fold a bias (an LSTM) keeps the removed inputs whose constant varies
        unfoldable = {root for v in sites if not v.folds_maps and (f := folds.get(v.node.name)) is not None
                      and f[0] != "bias" for root in _removed_classes_read(v, analysis, sel)}
        if not unfoldable:
            break
        sel = select(analysis, sel.removed - unfoldable)
    if alignment is not None:
        finish(alignment, analysis, sel, aligned_sel)
    shared = _shared_layers(views)
    constant = {root for root, why in found.items() if why == "zero producers"}
    for v in sites:
        fold = folds.get(v.node.name)
        if fold is not None and fold[0] != "bias" and v.node.name not in shared:
            carried = _carried(v, captured[v.node.name], sel, analysis, constant, fold)
            if carried is not None:
                folds[v.node.name] = ("carrier", carried)
    map_feeders = {root for v in sites if (f := folds.get(v.node.name)) is not None and f[0] == "constant map"
                   for root in _removed_classes_read(v, analysis, sel)}

    layers: list[LayerChange] = []
    cut: set[tuple[str, ...]] = set()  # a layer called several times is cut once
    for node in list(work.graph.nodes):
        if node.name in views:
            view, fold = views[node.name], folds.get(node.name)
            if node.name in shared and fold is not None and fold[0] == "bias":
                fold = folds[node.name] = _per_call(fold[1], view, analysis.values[node.name])
            tensors = tuple(sorted(view.tensors.values()))
            change = _shrink(view, sel, analysis.values, fold, cut_tensors=tensors not in cut)
            cut.add(tensors)
            if change is not None:
                layers.append(change)
        elif node.name in analysis.ops:
            channel_args = SPECS[analysis.ops[node.name]].channel_args
            x = tensor_arg(node, analysis.values)
            if channel_args is not None and x is not None:
                channel_args.rewrite(node, sel, x, analysis.values[x.name].shape)
    attr_keep = _shrink_attributes(work, analysis, sel)
    _resize_constants(work, analysis, attr_keep)
    aliases = _add_constant_maps(work, folds, analysis.values)
    _drop_stale_aliases(work, storage)
    work.graph.lint()
    work.recompile()

    return RemovalRecord(
        layers=layers,
        removed_groups=_removed_groups(analysis, sel, found, alignment),
        pinned_groups=[{"id": g.id, "size": g.size, "tensors": sorted({s.tensor for s in g.slices}),
                        "reasons": g.pinned} for g in analysis.groups if g.pinned],
        params_before=params_before,
        params_after=sum(p.numel() for p in work.parameters()),
        kept_indices=_kept_indices(analysis, sel, attr_keep),
        aliases=aliases,
        folded_weights=dict(analysis.folded_weights),
        alignment=alignment,
        map_feeders=map_feeders,
    )


def _removed_classes_read(view: LayerView, analysis: ChannelAnalysis, sel: Any) -> set[int]:
    """The removed classes among the channels a layer reads."""
    x = view.node.args[0] if view.node is not None and view.node.args else None
    m = analysis.class_maps.get(x.name) if isinstance(x, fx.Node) else None
    return set() if m is None else set(m.unique().tolist()) & sel.removed


def _layer(gm: fx.GraphModule, node: fx.Node, analysis: ChannelAnalysis) -> LayerView | None:
    spec = SPECS.get(analysis.ops.get(node.name, ""))
    return spec.layer.of(gm, node) if spec is not None and spec.layer is not None else None


class _InputCapture(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, inputs: dict[str, fx.Node]) -> None:
        super().__init__(gm)
        self.wanted, self.inputs = inputs, {}  # consumer name -> its input node

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.wanted:  # read as the consumer reads it (after any in-place op)
            self.inputs[n.name] = self.env[self.wanted[n.name]][0:1].detach().double()
        return super().run_node(n)


def _capture_inputs(gm: fx.GraphModule, example_input: Any, sites: list[LayerView],
                    sel: Selection) -> dict[str, torch.Tensor]:
    """Inputs (batch item 0) of the consumers that read removed channels."""
    wanted = {v.node.name: v.input for v in sites if not sel.node_kept(v.input.name).all()}
    if not wanted:
        return {}
    cap = _InputCapture(gm, wanted)
    with torch.no_grad():
        cap.run(*(example_input if isinstance(example_input, tuple) else (example_input,)))
    return cap.inputs


def _fold(view: LayerView, x: torch.Tensor, sel: Selection, values: dict[str, Any]) -> tuple | None:
    """How the removed input channels' constant is folded at this consumer:
    ("bias", vector) | ("border kernel", BorderKernel) | ("constant map", dense map) | None
    (`_remove` then turns maps a kept constant channel can carry into ("carrier", CarrierFold))."""
    keep_in = sel.node_kept(view.input.name).expand(x.shape[:1] + values[view.input.name].shape[1:])
    x_gone = x * (~keep_in).to(x.dtype)
    fold = _contribution(view, x_gone, sel, values)
    geometry = view.geometry() if fold is not None and fold[0] == "constant map" else None
    if geometry is not None:
        keep_out = sel.present(view.node.name, 1, geometry.weight.shape[0])
        compact = border_kernel(geometry, x_gone, keep_out, fold[1])
        if compact is not None:
            return ("border kernel", compact)
    return fold


def _carried(view: LayerView, x: torch.Tensor, sel: Selection, analysis: ChannelAnalysis, constant: set[int],
             fold: tuple) -> CarrierFold | None:
    """The fold of a consumer's map into a kept constant input channel (`channel_carriers`), or None."""
    m = analysis.class_maps.get(view.input.name) if isinstance(view.input, fx.Node) else None
    if not isinstance(m, torch.Tensor) or any(d != 1 for d in varying_dims(m)):
        return None
    return carrier_fold(view, x, along(m, 1, x.shape[1]), sel.removed, constant, _max_abs(fold))


def _contribution(view: LayerView, x_gone: torch.Tensor, sel: Selection, values: dict[str, Any]) -> tuple | None:
    """What the removed input channels (`x_gone`: the input with kept channels zeroed) add to
    the consumer's output (float64), or None."""
    with torch.no_grad():
        c = view.consumer()(x_gone)
    out_dim = view.out_dim % c.dim()
    keep_out = view.kept_consumer_out(sel, values, c.shape[out_dim])
    c = c.index_select(out_dim, keep_out.nonzero().flatten())
    scale = float(c.abs().max()) if c.numel() else 0.0
    if scale == 0.0:
        return None
    other = [d for d in range(c.dim()) if d != out_dim]
    mean = c.mean(dim=other, keepdim=True)
    if float((c - mean).abs().max()) <= 1e-10 * scale:
        return ("bias", mean.flatten())
    return ("constant map", c)


def _shared_layers(views: dict[str, LayerView]) -> set[str]:
    """Nodes of layers whose tensors other nodes read too (one layer called several times)."""
    readers: dict[str, set[str]] = {}
    for name, view in views.items():
        for key in view.tensors.values():
            readers.setdefault(key, set()).add(name)
    return {name for names in readers.values() if len(names) > 1 for name in names}


def _per_call(vec: torch.Tensor, view: LayerView, out: TensorMeta) -> tuple:
    """A bias fold of one call of a shared layer: added after that call, not into the bias
    every call reads (a constant map that broadcasts over the other dims)."""
    shape = [1] * len(out.shape)
    shape[view.out_dim % len(shape)] = vec.numel()
    return ("constant map", vec.reshape(shape))


def _shrink(view: LayerView, sel: Selection, values: dict[str, Any], fold: tuple | None, *,
            cut_tensors: bool = True) -> LayerChange | None:
    x, node = view.input, view.node
    keep_in = sel.present(x.name, view.in_dim, values[x.name].shape[view.in_dim])
    keep_out = view.kept_out(sel, values)
    if keep_in.all() and keep_out.all() and fold is None:
        return None
    before = view.shapes()
    if fold is not None and fold[0] == "carrier":
        fold_into_carrier(view, fold[1])
    if cut_tensors and not (keep_in.all() and keep_out.all()):
        view.shrink(keep_in, keep_out)
    if fold is not None and fold[0] == "bias":
        view.fold_bias(fold[1])
    return LayerChange(view.name, view.form.label, before, view.shapes(), fold[0] if fold else None,
                       _max_abs(fold))


def _max_abs(fold: tuple | None) -> float | None:
    if fold is None:
        return None
    if isinstance(fold[1], CarrierFold):
        return fold[1].max_abs
    value = fold[1].evaluate() if isinstance(fold[1], BorderKernel) else fold[1]
    return float(value.abs().max())


def _shrink_attributes(gm: fx.GraphModule, analysis: ChannelAnalysis,
                       sel: Selection) -> dict[tuple[str, int], torch.Tensor]:
    """Per-channel tensors used through get_attr (layer scale, position tables): slice them too.
    Returns the kept mask of each (tensor, dim) that was cut."""
    kept: dict[tuple[str, int], torch.Tensor] = {}
    for s in analysis.attribute_slices:
        cur = kept.setdefault((s.key, s.dim), torch.zeros(int(s.index.max()) + 1, dtype=torch.bool))
        cur[s.index[sel.kept(s.cls)]] = True
    for (key, dim), mask in kept.items():
        if not mask.all():
            replace_tensor(gm, key, keep(get_tensor(gm, key), dim, mask))
    return {k: m for k, m in kept.items() if not m.all()}


def _resize_constants(gm: fx.GraphModule, analysis: ChannelAnalysis,
                      attr_keep: dict[tuple[str, int], torch.Tensor]) -> None:
    """Values computed from a cut parameter: views / expands that name its size literally get
    the kept size; reads of their size keep answering the original one (as for activations)."""
    for node in list(gm.graph.nodes):
        if node.name not in analysis.provenance:
            continue
        key, dims = analysis.provenance[node.name]
        counts = {j: int(attr_keep[(key, p)].sum()) for j, p in enumerate(dims) if (key, p) in attr_keep}
        if not counts:
            continue
        if resizes(node):
            resize_constant(node, counts)
        for user in list(node.users):
            freeze_size_read(user, node, analysis.values[node.name].shape, sorted(counts))


def _drop_stale_aliases(gm: fx.GraphModule, storage: dict[str, int]) -> None:
    """A .pt2 program names a module used in several places once per place: the graph reads
    one name, the others stay as aliases nothing reads. After the read one was cut, an alias
    would keep the full tensor in the slim files: aliases nothing reads are dropped."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    shared = {ptr for ptr, n in Counter(storage.values()).items() if n > 1 and ptr}
    for key, t in list(gm.state_dict(keep_vars=True).items()):
        if storage.get(key) in shared and key not in read and not any(key.startswith(f"{m}.") for m in called):
            owner, _, attr = key.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)


def _add_constant_maps(gm: fx.GraphModule, folds: dict[str, tuple | None],
                       values: dict[str, Any]) -> dict[str, str]:
    """Add each position-dependent fold right after its consumer: a dense map buffer
    `_rw_const_<node>`, or a border kernel `_rw_const_kernel_<node>` (+ `_rw_const_pattern_<node>`
    when the pattern is not the ones image) convolved in forward. Returns consumer -> add node."""
    aliases = {}
    by_name = {n.name: n for n in gm.graph.nodes}
    ones: dict[tuple, fx.Node] = {}  # one ones image per (spatial shape, dtype), shared by all sites
    for name, fold in folds.items():
        if fold is None or fold[0] in ("bias", "carrier"):
            continue
        node, dtype = by_name[name], values[name].dtype
        if fold[0] == "border kernel":
            map_node = _border_kernel_nodes(gm, node, fold[1], dtype, ones)
        else:
            buf = f"_rw_const_{name}"
            gm.register_buffer(buf, fold[1].to(dtype).contiguous())
            with gm.graph.inserting_after(node):
                map_node = gm.graph.get_attr(buf)
        with gm.graph.inserting_after(map_node):
            add = gm.graph.call_function(operator.add, (node, map_node))
        node.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
        aliases[name] = add.name
    return aliases


def _border_kernel_nodes(gm: fx.GraphModule, node: fx.Node, bk: BorderKernel, dtype: torch.dtype,
                         ones: dict[tuple, fx.Node]) -> fx.Node:
    """Nodes computing conv(pattern, kernel) right after `node`; returns the last one."""
    kbuf = f"_rw_const_kernel_{node.name}"
    gm.register_buffer(kbuf, bk.kernel.to(dtype).contiguous())
    if bk.patterns is None:
        key = (bk.spatial, dtype)
        if key not in ones:  # made from the first kernel, at the top: before every user
            first = next(n for n in gm.graph.nodes if n.op != "placeholder")
            with gm.graph.inserting_before(first):
                like = gm.graph.get_attr(kbuf)
                ones[key] = gm.graph.call_method("new_ones", (like, (1, 1, *bk.spatial)))
        source = ones[key]
    else:
        pbuf = f"_rw_const_pattern_{node.name}"
        gm.register_buffer(pbuf, bk.patterns.to(dtype).contiguous())
        with gm.graph.inserting_after(node):
            source = gm.graph.get_attr(pbuf)
    with gm.graph.inserting_after(source if bk.patterns is not None else node):
        kernel = gm.graph.get_attr(kbuf)
    g = bk.geometry
    with gm.graph.inserting_after(kernel):
        return gm.graph.call_function(CONV_FUNCTIONS[len(bk.spatial)],
                                      (source, kernel, None, g.stride, g.padding, g.dilation))


def _kept_indices(analysis: ChannelAnalysis, sel: Selection,
                  attr_keep: dict[tuple[str, int], torch.Tensor]) -> dict[str, dict[int, list[int]]]:
    out: dict[str, dict[int, list[int]]] = {}
    for name, (key, dims) in analysis.provenance.items():  # constants computed from a cut parameter
        cut = {d: attr_keep[(key, p)].nonzero().flatten().tolist() for d, p in enumerate(dims)
               if (key, p) in attr_keep}
        if cut:
            out[name] = cut
    for name, m in analysis.class_maps.items():
        meta = analysis.values.get(name)
        if not isinstance(m, torch.Tensor) or not isinstance(meta, TensorMeta):
            continue
        dims = {}
        for d in range(m.dim()):
            if m.shape[d] > 1:
                p = sel.present(name, d, meta.shape[d])
                if not p.all():
                    dims[d] = p.nonzero().flatten().tolist()
        if dims:
            out[name] = dims
    return out


def _removed_groups(analysis: ChannelAnalysis, sel: Selection, found: dict[int, str],
                    alignment: AlignmentRecord | None = None) -> list[dict[str, Any]]:
    aligned = {g.id: g.kept_for_alignment for g in alignment.groups} if alignment is not None else {}
    out = []
    for g in analysis.groups:
        gone = [c for c, r in enumerate(g.classes) if r in sel.removed]
        if not gone:
            continue
        why = sorted({found[g.classes[c]] for c in gone})
        out.append({"id": g.id, "size": g.size, "unit": g.unit, "removed": len(gone), "channels": gone,
                    "why": why, "tensors": sorted({s.tensor for s in g.slices}),
                    "kept_back": sum(1 for r in g.classes if r in found and r not in sel.removed) - aligned.get(g.id, 0),
                    **({"kept_for_alignment": aligned[g.id]} if g.id in aligned else {})})
    return out
