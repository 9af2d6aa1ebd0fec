"""Pass: physically remove zero channel groups, folding the constants they still carry.

A removed channel whose producing weights are zero still carries a constant (conv bias, the
BatchNorm shift, passed through any elementwise function, pooled, ...). Its consumers read
that constant: the pass runs each consumer on exactly the removed channels' values (which do
not depend on the input) and adds the result back - into the consumer's bias when it is the
same at every position, otherwise as a precomputed constant map (a buffer added right after
the consumer; zero padding and pooling make contributions position-dependent). The slim model
computes the same function as the original for inputs of the example input's shape.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from rwdeploy.errors import OptionError
from rwdeploy.passes.channel_constants import CONV_FUNCTIONS, BorderKernel, border_kernel, conv_geometry
from rwdeploy.passes.channel_groups import ChannelAnalysis, analyze_channel_groups
from rwdeploy.passes.channel_rewrite import (
    FUNCTIONAL_ARGS,
    MODULE_SHRINKERS,
    rewrite_args,
    set_arg,
    shrink_functional,
)
from rwdeploy.passes.channel_rules import base_name, bound_args
from rwdeploy.passes.channel_selection import Selection, candidates, select
from rwdeploy.passes.channel_state import TensorMeta
from rwdeploy.passes.result import PassResult


@dataclass
class LayerChange:
    name: str
    type: str
    before: dict[str, list[int]]
    after: dict[str, list[int]]
    folded: str | None = None  # "bias", "border kernel" or "constant map"
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "layers": [layer.to_dict() for layer in self.layers],
            "removed_groups": self.removed_groups,
            "pinned_groups": self.pinned_groups,
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


def remove_zero_channels(gm: fx.GraphModule, example_input: torch.Tensor, *,
                         analysis: ChannelAnalysis | None = None,
                         masks: dict[str, torch.Tensor] | None = None) -> PassResult:
    """A new, smaller GraphModule computing the same function; `gm` is not modified."""
    work = copy.deepcopy(gm)
    if masks:
        apply_masks(work, masks)
    if analysis is None or masks:
        analysis = analyze_channel_groups(work, example_input)
    params_before = sum(p.numel() for p in work.parameters())
    state_dict = work.state_dict()
    found = candidates(analysis, state_dict)
    sel = select(analysis, set(found))
    st = analysis.state
    modules = dict(work.named_modules())

    sites = [n for n in work.graph.nodes if n.name in set(st.fold_sites)]
    captured = _capture_inputs(work, example_input, sites, sel)
    folds = {n.name: _fold(work, n, st.kinds[n.name], captured[n.name], sel, st)
             for n in sites if n.name in captured}

    layers: list[LayerChange] = []
    for node in list(work.graph.nodes):
        kind = st.kinds.get(node.name)
        if node.op == "call_module" and kind in MODULE_SHRINKERS:
            change = _shrink_module(node, kind, modules[node.target], sel, st.values, folds.get(node.name))
        elif kind in FUNCTIONAL_KINDS:
            change = _shrink_functional(work, node, kind, sel, st.values, folds.get(node.name))
        else:
            change = None
            if kind is not None:
                rewrite_args(node, kind, sel, st.values)
        if change is not None:
            layers.append(change)
    attr_keep = _shrink_attributes(work, analysis, sel)
    aliases = _add_constant_maps(work, folds, st.values)
    work.graph.lint()
    work.recompile()

    record = RemovalRecord(
        layers=layers,
        removed_groups=_removed_groups(analysis, sel, found),
        pinned_groups=[{"id": g.id, "size": g.size, "tensors": sorted({s.tensor for s in g.slices}),
                        "reasons": g.pinned} for g in analysis.groups if g.pinned],
        params_before=params_before,
        params_after=sum(p.numel() for p in work.parameters()),
        kept_indices=_kept_indices(st, sel, attr_keep),
        aliases=aliases,
    )
    return PassResult(work, record)


class _InputCapture(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names, self.inputs = names, {}

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.names:
            self.inputs[n.name] = self.env[n.args[0]][0:1].detach().double()
        return super().run_node(n)


def _capture_inputs(gm: fx.GraphModule, example_input: Any, sites: list[fx.Node],
                    sel: Selection) -> dict[str, torch.Tensor]:
    """Inputs (batch item 0) of the consumers that read removed channels."""
    names = {n.name for n in sites if not sel.node_kept(n.args[0].name).all()}
    if not names:
        return {}
    cap = _InputCapture(gm, names)
    with torch.no_grad():
        cap.run(*(example_input if isinstance(example_input, tuple) else (example_input,)))
    return cap.inputs


def _consumer_fn(gm: fx.GraphModule, node: fx.Node, kind: str):
    """The consumer as a float64 function of its input, without bias."""
    if node.op == "call_module":
        ref = copy.deepcopy(gm.get_submodule(node.target)).double()
        ref.bias = None
        return ref
    b = bound_args(node, FUNCTIONAL_ARGS[kind])
    w = gm.get_parameter(b["weight"].target).detach().double()
    if kind == "flinear":
        return lambda x: F.linear(x, w)
    if kind == "fconv_transpose":
        convt = {3: F.conv_transpose1d, 4: F.conv_transpose2d, 5: F.conv_transpose3d}[w.dim()]
        return lambda x: convt(x, w, None, b.get("stride", 1), b.get("padding", 0), b.get("output_padding", 0),
                               1, b.get("dilation", 1))
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]
    return lambda x: conv(x, w, None, b.get("stride", 1), b.get("padding", 0), b.get("dilation", 1),
                          b.get("groups", 1))


def _fold(gm: fx.GraphModule, node: fx.Node, kind: str, x: torch.Tensor, sel: Selection, st) -> tuple | None:
    """How the removed input channels' constant is folded at this consumer:
    ("bias", vector) | ("border kernel", BorderKernel) | ("constant map", dense map) | None."""
    keep = sel.node_kept(node.args[0].name).expand(x.shape[:1] + st.values[node.args[0].name].shape[1:])
    x_gone = x * (~keep).to(x.dtype)
    fold = _contribution(_consumer_fn(gm, node, kind), x_gone, node, sel, st)
    geometry = conv_geometry(gm, node, kind) if fold is not None and fold[0] == "constant map" else None
    if geometry is not None:
        keep_out = sel.present(node.name, 1, geometry.weight.shape[0])
        compact = border_kernel(geometry, x_gone, keep_out, fold[1])
        if compact is not None:
            return ("border kernel", compact)
    return fold


def _contribution(fn, x_gone: torch.Tensor, node: fx.Node, sel: Selection, st) -> tuple | None:
    """What the removed input channels (`x_gone`: the input with kept channels zeroed) add to
    the consumer's output (float64), or None."""
    with torch.no_grad():
        c = fn(x_gone)
    out_dim = c.dim() - 1 if st.kinds[node.name] in ("linear", "flinear") else 1
    keep_out = sel.present(node.name, out_dim, c.shape[out_dim])
    c = c.index_select(out_dim, keep_out.nonzero().flatten())
    scale = float(c.abs().max()) if c.numel() else 0.0
    if scale == 0.0:
        return None
    other = [d for d in range(c.dim()) if d != out_dim]
    mean = c.mean(dim=other, keepdim=True)
    if float((c - mean).abs().max()) <= 1e-10 * scale:
        return ("bias", mean.flatten())
    return ("constant map", c)


FUNCTIONAL_KINDS = ("fconv", "fconv_transpose", "flinear", "fbatchnorm", "fgroupnorm", "fprelu")


def _shrink_functional(gm: fx.GraphModule, node: fx.Node, kind: str, sel: Selection,
                       values: dict[str, Any], fold: tuple | None) -> LayerChange | None:
    x = node.args[0]
    in_dim = out_dim = -1 if kind == "flinear" else 1
    keep_in = sel.present(x.name, in_dim, values[x.name].shape[in_dim])
    keep_out = sel.present(node.name, out_dim, values[node.name].shape[out_dim])
    if keep_in.all() and keep_out.all() and fold is None:
        return None
    shapes = shrink_functional(gm, node, kind, keep_in, keep_out)
    folded = None
    if fold is not None and fold[0] == "bias":
        names = FUNCTIONAL_ARGS[kind]
        bias = bound_args(node, names).get("bias")
        if isinstance(bias, fx.Node):
            with torch.no_grad():
                gm.get_parameter(bias.target).add_(fold[1].to(values[node.name].dtype))
        else:  # the layer had no bias: give it one
            key = f"_rw_bias_{node.name}"
            gm.register_parameter(key, nn.Parameter(fold[1].to(values[node.name].dtype).clone()))
            with gm.graph.inserting_before(node):
                attr = gm.graph.get_attr(key)
            set_arg(node, names, "bias", attr)
        folded = "bias"
    elif fold is not None:
        folded = fold[0]
    weight = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], fx.Node) else None
    name = weight.target.rpartition(".")[0] if weight is not None else node.name
    return LayerChange(name or node.name, f"{base_name(node)} (functional)",
                       {k: v[0] for k, v in shapes.items()}, {k: v[1] for k, v in shapes.items()}, folded,
                       _max_abs(fold))


def _shrink_module(node: fx.Node, kind: str, mod: nn.Module, sel: Selection, values: dict[str, Any],
                   fold: tuple | None) -> LayerChange | None:
    shrink, in_dim, out_dim = MODULE_SHRINKERS[kind]
    x = node.args[0]
    in_shape, out_shape = values[x.name].shape, values[node.name].shape
    keep_in = sel.present(x.name, in_dim, in_shape[in_dim])
    keep_out = sel.present(node.name, out_dim, out_shape[out_dim])
    before = _shapes(mod)
    if keep_in.all() and keep_out.all() and fold is None:
        return None
    if not (keep_in.all() and keep_out.all()):
        shrink(mod, keep_in, keep_out)
    folded = None
    if fold is not None and fold[0] == "bias":
        vec = fold[1].to(mod.weight.dtype)
        if mod.bias is None:
            mod.bias = nn.Parameter(vec.clone())
        else:
            with torch.no_grad():
                mod.bias.add_(vec)
        folded = "bias"
    elif fold is not None:
        folded = fold[0]
    return LayerChange(node.target, type(mod).__name__, before, _shapes(mod), folded, _max_abs(fold))


def _max_abs(fold: tuple | None) -> float | None:
    if fold is None:
        return None
    value = fold[1].evaluate() if isinstance(fold[1], BorderKernel) else fold[1]
    return float(value.abs().max())


def _shapes(mod: nn.Module) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in mod.state_dict().items()}


def _shrink_attributes(gm: fx.GraphModule, analysis: ChannelAnalysis,
                       sel: Selection) -> dict[tuple[str, int], torch.Tensor]:
    """Per-channel tensors used through get_attr (layer scale, position tables): slice them too.
    Returns the kept mask of each (tensor, dim) that was cut."""
    owners = analysis.state.attr_followers
    keep: dict[tuple[str, int], torch.Tensor] = {}
    for s in analysis.state.slices:
        if s.key not in owners:
            continue
        kept = sel.kept(s.cls)
        cur = keep.setdefault((s.key, s.dim), torch.zeros(int(s.index.max()) + 1, dtype=torch.bool))
        cur[s.index[kept]] = True
    for (key, dim), mask in keep.items():
        if mask.all():
            continue
        owner_name, _, attr = key.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        old = getattr(owner, attr)
        new = old.detach().index_select(dim, mask.nonzero().flatten()).clone()
        setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad)
                if isinstance(old, nn.Parameter) else new)
    return {k: m for k, m in keep.items() if not m.all()}


def _add_constant_maps(gm: fx.GraphModule, folds: dict[str, tuple | None],
                       values: dict[str, Any]) -> dict[str, str]:
    """Add each position-dependent fold right after its consumer: a dense map buffer
    `_rw_const_<node>`, or a border kernel `_rw_const_kernel_<node>` (+ `_rw_const_pattern_<node>`
    when the pattern is not the ones image) convolved in forward. Returns consumer -> add node."""
    aliases = {}
    by_name = {n.name: n for n in gm.graph.nodes}
    ones: dict[tuple, fx.Node] = {}  # one ones image per (spatial shape, dtype), shared by all sites
    for name, fold in folds.items():
        if fold is None or fold[0] == "bias":
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


def _kept_indices(st, sel: Selection, attr_keep: dict[tuple[str, int], torch.Tensor]) -> dict[str, dict[int, list[int]]]:
    out: dict[str, dict[int, list[int]]] = {}
    for name, (key, dims) in st.provenance.items():  # constants computed from a cut parameter
        cut = {d: attr_keep[(key, p)].nonzero().flatten().tolist() for d, p in enumerate(dims)
               if (key, p) in attr_keep}
        if cut:
            out[name] = cut
    for name, m in st.maps.items():
        meta = st.values.get(name)
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


def _removed_groups(analysis: ChannelAnalysis, sel: Selection, found: dict[int, str]) -> list[dict[str, Any]]:
    out = []
    for g in analysis.groups:
        gone = [c for c, r in enumerate(g.classes) if r in sel.removed]
        if not gone:
            continue
        why = sorted({found[g.classes[c]] for c in gone})
        out.append({"id": g.id, "size": g.size, "unit": g.unit, "removed": len(gone), "channels": gone,
                    "why": why, "tensors": sorted({s.tensor for s in g.slices}),
                    "kept_back": sum(1 for r in g.classes if r in found and r not in sel.removed)})
    return out
