"""Channel counts the hardware likes: which of a group's removable zero channels to keep anyway.

Keeping a zero channel is always exact (the removal pass folds only what it removes; a kept zero
channel computes what it computed before), so the removal pass may keep a few of a group's
removable channels when a rounded count runs faster than the smallest one. Counts are in
group channels; the tensor channels the hardware sees are `count * unit`, and those are what
is rounded (a multiple of `multiple` tensor channels).

- `align="off"`: nothing kept back.
- `align=N` (an int): every group that loses channels keeps the smallest count >= its minimum whose
  tensor channels are a multiple of N, when the group has that many (no measuring).
- `align="auto"`: per group, candidates are the minimum and the next multiple of the target's
  vector width (`lanes`). They are timed by the injected measurer (`measurer(cases) -> {count:
  {"median_ms": ...}}`, `cases` = {count: [(layer name, nn.Module, input shape)]}: the group's
  producing and consuming convs / linears rebuilt at that count) and the fastest median wins (a
  tie: the smaller count), so the chosen count is never one the record measured as slower.
  Groups that cannot be measured (no measurer, a layer that is not a plain conv / linear,
  layers too small to time reliably, over the budget of measured groups, a measurer error) are
  decided by the cost model `tail_cost`: a vector of `lanes` channels costs `lanes`, each
  channel of a partial vector (the tail) costs 2 (a masked or scalar tail runs at most half
  as fast); the cheaper count wins, the smaller one on a tie. So the aligned count is chosen
  when the tail is longer than half a vector, i.e. when it keeps fewer than `lanes / 2` extra
  tensor channels.

`compile --align auto` runs this per-group plan as one candidate among whole models (off, N =
lanes / 2, N = lanes), the fastest measured kept: `passes/whole_model_alignment.py`.

Which channels are kept back is deterministic: the removable ones with the lowest indices.
This module decides; it never measures (the measurer comes from the caller) and never prints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from torch import nn

from rwdeploy.errors import OptionError
from rwdeploy.passes.ops import LayerView
from rwdeploy.passes.ops.conv import ConvView
from rwdeploy.passes.ops.linear import LinearView

if TYPE_CHECKING:  # types only: `rwdeploy.context` reads `parse_align` without loading the analysis
    from rwdeploy.passes.channel_groups import ChannelAnalysis, ChannelGroup
    from rwdeploy.passes.channel_selection import Selection

ALIGN_MODES = ("off", "auto")
LayerCase = tuple[str, nn.Module, Sequence[int]]  # (layer name, the layer at a candidate count, input shape)
LayerShape = tuple[LayerView, int, int, list[int], int]  # (view, in channels, out channels, input shape, MACs)
# {kept count: its layers} -> {kept count: {"median_ms": ...}}; may say where it measured (`.where`)
Measurer = Callable[[dict[int, list[LayerCase]]], dict[int, dict[str, float]]]
MAX_MEASURED_GROUPS = 12  # auto: groups timed at most per compile (largest layers first), the rest by cost model
MIN_MEASURED_MACS = 100_000  # auto: groups whose layers do less work are decided by the cost model


def parse_align(value: Any) -> str | int:
    """`--align` as given ("auto", "off", "8", 8) -> "auto" | "off" | a positive int."""
    text = str(value).strip().lower()
    if text in ALIGN_MODES:
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise OptionError(f"--align {value!r} is not auto, off or a positive channel multiple",
                          hint="use --align auto (measured), --align off, or e.g. --align 8")
    return n


def aligned_count(kept: int, unit: int, multiple: int, size: int) -> int | None:
    """The smallest count >= `kept` (and <= `size`) whose tensor channels (`count * unit`) are a
    multiple of `multiple`; None when the group has no such count."""
    k = kept
    while k <= size:
        if (k * unit) % multiple == 0:
            return k
        k += 1
    return None


def candidate_counts(size: int, kept: int, unit: int, multiple: int) -> list[int]:
    """Kept counts worth trying: the minimum `kept`, then the next aligned count when it differs."""
    aligned = aligned_count(kept, unit, multiple, size)
    return [kept] if aligned is None or aligned == kept else [kept, aligned]


def tail_cost(channels: int, lanes: int) -> int:
    """The cost model: whole vectors cost `lanes`, each channel of the tail 2 (see the module doc)."""
    return lanes * (channels // lanes) + 2 * (channels % lanes)


def _fastest(costs: dict[int, float]) -> int:
    """The cheapest count, the smaller one on a tie."""
    return min(costs, key=lambda k: (costs[k], k))


@dataclass
class GroupAlignment:
    """What alignment decided for one group that loses channels (counts in group channels)."""

    id: int
    size: int
    unit: int
    removable: int  # the channels the plain removal takes out (after the structural constraints)
    candidates: list[dict[str, Any]]  # {"kept", "median_ms"?, "cost"?} per candidate kept count
    chosen: int  # kept count chosen
    reason: str
    layers: list[str] = field(default_factory=list)  # the layers measured
    removed: int = 0  # channels removed in the end
    kept_for_alignment: int = 0  # removable channels kept back

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "size": self.size, "unit": self.unit, "removable": self.removable,
                "removed": self.removed, "kept_for_alignment": self.kept_for_alignment, "kept": self.size - self.removed,
                "chosen": self.chosen, "candidates": self.candidates, "reason": self.reason, "layers": self.layers}


@dataclass
class AlignmentRecord:
    mode: str  # "auto" | "N" (the multiple)
    multiple: int  # tensor channels the counts are rounded to (auto: the target's vector lanes)
    measured_on: str | None
    groups: list[GroupAlignment]
    note: str | None = None  # the caller's word on how it measured (e.g. why nothing was)
    # auto decided for the whole model (`passes/whole_model_alignment.py`): every candidate's median,
    # the original's, the chosen candidate and why; `groups` are then the chosen plan's
    whole_model: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "multiple": self.multiple, "measured_on": self.measured_on, "note": self.note,
                "kept_for_alignment": sum(g.kept_for_alignment for g in self.groups),
                "groups": [g.to_dict() for g in self.groups],
                **({"whole_model": self.whole_model} if self.whole_model is not None else {})}


def _gone(g: ChannelGroup, sel: Selection) -> list[int]:
    return [c for c, root in enumerate(g.classes) if root in sel.removed]


def plan_alignment(analysis: ChannelAnalysis, sel: Selection, views: dict[str, LayerView], *, align: str | int,
                   lanes: int, measurer: Measurer | None = None, max_measured: int = MAX_MEASURED_GROUPS,
                   min_macs: int = MIN_MEASURED_MACS) -> tuple[set[int], AlignmentRecord]:
    """The classes to keep back from `sel.removed` (lowest removable indices of each group), and the
    record (its `removed` / `kept_for_alignment` are filled in by `finish` once the selection is final)."""
    multiple = lanes if align == "auto" else int(align)
    groups, pending = [], []
    for g in analysis.groups:
        gone = _gone(g, sel)
        if g.pinned or not gone:
            continue
        kept = g.size - len(gone)
        counts = candidate_counts(g.size, kept, g.unit, multiple)
        rec = GroupAlignment(g.id, g.size, g.unit, len(gone), [{"kept": k} for k in counts], kept, "")
        groups.append(rec)
        if len(counts) == 1:
            rec.reason = (f"already a multiple of {multiple}" if (kept * g.unit) % multiple == 0
                          else f"no multiple of {multiple} between {kept} and {g.size} kept channels")
        elif align != "auto":
            rec.chosen, rec.reason = counts[1], f"rounded up to a multiple of {multiple} (--align {multiple})"
        else:
            try:
                shapes: dict[int, list[LayerShape]] | str = _layer_shapes(g, gone, counts, sel, views, analysis.values)
            except Exception as err:  # noqa: BLE001 - an optimisation never stops the compile: cost model
                shapes = f"its layers could not be modelled ({type(err).__name__}: {str(err).strip()[:120]})"
            pending.append((rec, shapes))
    measured = _measure(pending, measurer, max_measured, min_macs)
    for rec, shapes in pending:
        times, why = measured[rec.id]
        if times is not None:
            for c in rec.candidates:
                c["median_ms"] = times[c["kept"]]
            rec.chosen = _fastest(times)
            rec.layers = [view.name for view, *_ in shapes[rec.candidates[0]["kept"]]]
            rec.reason = "measured fastest: " + ", ".join(f"{k} kept {times[k]:.4g} ms" for k in
                                                          sorted(times, key=lambda k: (times[k], k)))
        else:
            costs = {c["kept"]: tail_cost(c["kept"] * rec.unit, multiple) for c in rec.candidates}
            for c in rec.candidates:
                c["cost"] = costs[c["kept"]]
            rec.chosen = _fastest(costs)
            rec.reason = f"cost model (not measured: {why}): " + ", ".join(f"{k} kept costs {v}" for k, v in costs.items())
    by_id = {g.id: g for g in analysis.groups}
    keep: set[int] = set()
    for rec in groups:
        gone = _gone(by_id[rec.id], sel)
        keep |= {by_id[rec.id].classes[c] for c in gone[:rec.chosen - (rec.size - len(gone))]}
    mode = "auto" if align == "auto" else str(multiple)
    timed = any(times is not None for times, _ in measured.values())
    where = (getattr(measurer, "where", None) or "caller-supplied measurer") if timed else None
    return keep, AlignmentRecord(mode, multiple, where, groups)


def finish(record: AlignmentRecord, analysis: ChannelAnalysis, sel: Selection,
           aligned: Selection | None = None) -> None:
    """Fill in what each group lost in the end: `sel` is the final selection, `aligned` the one
    right after alignment (default `sel`). Between the two the removal may keep more for other
    reasons (an LSTM that cannot fold a varying constant); those are not counted as alignment's."""
    by_id = {g.id: g for g in analysis.groups}
    for rec in record.groups:
        rec.removed = len(_gone(by_id[rec.id], sel))
        rec.kept_for_alignment = rec.removable - len(_gone(by_id[rec.id], aligned or sel))


def _measure(pending: list[tuple[GroupAlignment, dict[int, list[LayerShape]] | str]], measurer: Measurer | None,
             max_measured: int, min_macs: int) -> dict[int, tuple[dict[int, float] | None, str | None]]:
    """Group id -> (median ms per kept count, None) when measured, else (None, why not). The layers
    are built (`layer_cases`) only for the groups measured, the ones with the most work first."""
    out: dict[int, tuple[dict[int, float] | None, str | None]] = {}
    ready = []
    for rec, shapes in pending:
        if measurer is None:
            out[rec.id] = (None, "no measurer")
        elif isinstance(shapes, str):
            out[rec.id] = (None, shapes)
        else:
            work = sum(layer[4] for layer in shapes[rec.candidates[0]["kept"]])
            if work < min_macs:
                out[rec.id] = (None, f"{work:,} MACs, too small to time reliably")
            else:
                ready.append((work, rec, shapes))
    ready.sort(key=lambda item: (-item[0], item[1].id))
    for i, (_, rec, shapes) in enumerate(ready):
        if i >= max_measured:
            out[rec.id] = (None, f"over the budget of {max_measured} measured groups")
            continue
        try:
            result = measurer(layer_cases(shapes))  # type: ignore[misc]
            times = {k: float(result[k]["median_ms"]) for k in shapes}
        except Exception as err:  # noqa: BLE001 - a failed measurement falls back to the cost model
            out[rec.id] = (None, f"measurement failed: {type(err).__name__}: {str(err).strip()[:120]}")
            continue
        out[rec.id] = (times, None)
    return out


def layer_cases(shapes: dict[int, list[LayerShape]]) -> dict[int, list[LayerCase]]:
    """What the measurer gets: per candidate count, each layer as a fresh module (random weights)
    with its input shape."""
    return {k: [(view.name, _build(view, n_in, n_out), shape) for view, n_in, n_out, shape, _ in layers]
            for k, layers in shapes.items()}


def _layer_shapes(g: ChannelGroup, gone: list[int], counts: list[int], sel: Selection, views: dict[str, LayerView],
                  values: dict[str, Any]) -> dict[int, list[LayerShape]] | str:
    """Per candidate kept count, the layers that produce or read the group's channels at the shapes
    they have once the selection is applied with that many channels kept (the extra ones: `gone`'s
    first; every other dim as the plain selection leaves it); or why the group cannot be measured so."""
    by_weight = {v.tensors.get("weight"): v for v in views.values()}
    layers: dict[str, tuple[LayerView, list]] = {}
    for s in g.slices:
        if s.role not in ("producer", "consumer"):
            continue
        view = by_weight.get(s.tensor)
        if view is None:
            return f"{s.tensor} is not a layer's weight"
        if not _plain(view):
            return f"{view.name} is not a linear or a plain or depthwise convolution"
        if s.span is not None or s.dim not in view.weight_dims:
            return f"{view.name} reads the channels in a way this measurement does not model"
        layers.setdefault(view.node.name, (view, []))[1].append(s)
    if not layers:
        return "no layer produces or reads the channels"
    order = {name: i for i, name in enumerate(views)}  # graph order
    layers = dict(sorted(layers.items(), key=lambda item: order[item[0]]))
    out: dict[int, list[LayerShape]] = {}
    for k in counts:
        extra, cases = gone[:k - counts[0]], []
        for name, (view, slices) in layers.items():
            x, y = values[view.input.name].shape, values[name].shape
            n_in = int(sel.present(view.input.name, view.in_dim, x[view.in_dim]).sum())
            n_out = int(sel.present(name, view.out_dim, y[view.out_dim]).sum())
            for s in slices:
                delta = sum(len(s.indices[c]) for c in extra)
                if s.dim == view.weight_dims[0]:
                    n_out += delta
                else:
                    n_in += delta
            if _depthwise(view):  # its rows are the group's channels (x its multiplier); its input follows
                n_in = n_out // (view.out_channels // view.in_channels)
            shape = list(x)
            shape[view.in_dim] = n_in
            per_output = (1 if _depthwise(view) else n_in) * math.prod(view.weight.shape[2:])
            macs = math.prod(y) // y[view.out_dim] * n_out * per_output
            cases.append((view, n_in, n_out, shape, macs))
        out[k] = cases
    return out


def _depthwise(view: LayerView) -> bool:
    return isinstance(view, ConvView) and view.groups > 1 and view.groups == view.in_channels


def _plain(view: LayerView) -> bool:
    """A layer `_build` rebuilds: a linear, or a conv (1-3d, zero padding) with groups 1 or depthwise."""
    if isinstance(view, LinearView):
        return True
    return (isinstance(view, ConvView) and not view.transposed and (view.groups == 1 or _depthwise(view))
            and 1 <= view.spatial <= 3 and view.setting("padding_mode", "zeros") == "zeros")


def _build(view: LayerView, n_in: int, n_out: int) -> nn.Module:
    """The layer as a fresh module with `n_in` inputs and `n_out` outputs (random weights)."""
    bias = "bias" in view.tensors
    if isinstance(view, LinearView):
        return nn.Linear(n_in, n_out, bias=bias).eval()
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[view.spatial - 1]
    return conv(n_in, n_out, tuple(view.weight.shape[2:]), stride=_arg(view.setting("stride", 1)),
                padding=_arg(view.setting("padding", 0)), dilation=_arg(view.setting("dilation", 1)),
                groups=n_in if _depthwise(view) else 1, bias=bias).eval()


def _arg(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value
