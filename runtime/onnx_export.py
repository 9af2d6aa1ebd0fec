"""Export a torch module to an ONNX file that stock ONNX Runtime loads.

Uses the TorchScript exporter (`dynamo=False`): it honours the requested opset exactly and
keeps every weight inside the one file. The batch dimension is exported as dynamic so one
file serves every batch size the latency table asks for. The exporter never mutates the
module: it works on a deep copy, put in eval mode.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import fx, nn

from rwdeploy.errors import ExportError
from rwdeploy.runtime.onnx_bn_fold import fold_batchnorm_through_constant_adds
from rwdeploy.runtime.onnx_windows import folds_as_conv_transposes, unfolds_as_slices

MIN_OPSET = 17
# The newest ONNX IR version ONNX Runtime 1.18+ loads; files above it are rejected at load.
MAX_ORT_IR_VERSION = 10
INPUT_NAME = "input"
OUTPUT_NAME = "output"


class OnnxExportError(ExportError):
    """The model could not be expressed as a valid ONNX file."""


@dataclass(frozen=True)
class OnnxExportInfo:
    path: str
    opset: int
    ir_version: int
    size_bytes: int
    dynamic_batch: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _exportable_copy(module: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """An independent copy in eval mode (the exporter toggles training flags and traces).

    A module unlifted from `torch.export` (`ExportedProgram.module()`) refuses `train()`, which
    the TorchScript exporter calls; rebuilding it as a plain GraphModule over the same graph and
    submodules removes that restriction without changing what it computes. A GraphModule's
    graph is then made exportable by the TorchScript exporter (see `_bind_optional_inputs`,
    `_sizes_as_methods`, `_adaptive_pools_as_matmuls`, `_copies_out_of_place`, `onnx_windows`:
    folds and unfolds).
    """
    clone = copy.deepcopy(module)
    if isinstance(clone, fx.GraphModule):
        clone = fx.GraphModule(clone, clone.graph)
        changed = _bind_optional_inputs(clone.graph) + _copies_out_of_place(clone.graph)
        changed += _sizes_as_methods(clone.graph)
        changed += _adaptive_pools_as_matmuls(clone, example_input) + folds_as_conv_transposes(clone)
        changed += unfolds_as_slices(clone, example_input)
        if changed:
            clone.graph.lint()
            clone.recompile()
    return clone.eval()


def _bind_optional_inputs(graph: fx.Graph) -> int:
    """Replace every placeholder after the first that has a default by that default.

    `fx.symbolic_trace` keeps optional forward() arguments as placeholders (timm's ViT:
    `forward(x, attn_mask=None, is_causal=False)`). The exporter passes their defaults as
    extra inputs and the tracer turns `False` into a tensor, which `scaled_dot_product_attention`
    then rejects as `is_causal`. The model is exported for its one input, so the defaults are
    constants. Returns how many placeholders were bound.
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    bound = 0
    for node in placeholders[1:]:
        if not node.args:  # a required second input: leave it, the export names it
            continue
        default = node.args[0]
        for user in list(node.users):
            user.args = fx.node.map_aggregate(user.args, lambda a: default if a is node else a)
            user.kwargs = fx.node.map_aggregate(user.kwargs, lambda a: default if a is node else a)
        graph.erase_node(node)
        bound += 1
    return bound


# A slice end at least this large means "to the end" (torch.export writes sys.maxsize).
_SLICE_TO_END = 2**62


def copy_into(base: torch.Tensor, src: torch.Tensor | float, chain: tuple[tuple[Any, ...], ...]) -> torch.Tensor:
    """`base` with the view `chain` of it replaced by `src` (a tensor, broadcast and cast to base's
    dtype, or a number), out of place: what `aten.copy_(view, src)` / `aten.fill_(view, src)` leave
    in `base`. `chain` holds ("slice", dim, start,
    end) (step 1) and ("select", dim, index) steps, applied in turn. The result is built from
    slices and concatenations of `base`, which every exporter lowers exactly."""
    if not chain:
        if not isinstance(src, torch.Tensor):
            return torch.full_like(base, src)
        return src.to(base.dtype).expand_as(base)
    kind, dim, *where = chain[0]
    head = (slice(None),) * dim
    if kind == "select":
        (index,) = where
        inner = copy_into(base.select(dim, index), src, chain[1:]).unsqueeze(dim)
        before = base[(*head, slice(None, index))] if index != 0 else None
        after = base[(*head, slice(index + 1, None))] if index != -1 else None
    else:
        start, end = where
        start = 0 if start is None else start
        end = None if end is None or end >= _SLICE_TO_END else end
        inner = copy_into(base[(*head, slice(start, end))], src, chain[1:])
        before = base[(*head, slice(None, start))] if start != 0 else None
        after = base[(*head, slice(end, None))] if end is not None else None
    parts = [t for t in (before, inner, after) if t is not None]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _view_step(node: fx.Node) -> tuple[Any, ...] | None:
    """The `copy_into` step of a slice (step 1) or select node with constant arguments, else None."""
    aten = torch.ops.aten
    args = list(node.args) + [None] * 5
    if node.op != "call_function" or node.kwargs or any(isinstance(a, fx.Node) for a in node.args[1:]):
        return None
    if node.target is aten.select.int and args[1] >= 0:
        return ("select", args[1], args[2])
    if node.target is aten.slice.Tensor and args[4] in (None, 1) and (args[1] is None or args[1] >= 0):
        return ("slice", 0 if args[1] is None else args[1], args[2], args[3])
    return None  # a negative dim would need the rank: such writes are left to the exporter


def _read_after(base: fx.Node, write: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether a value computed from `base` before `write` (a view of it above all, which would
    see the write) is read after it."""
    here, stack, seen = order[write], list(base.users), set()
    while stack:
        node = stack.pop()
        if node in seen or order[node] >= here:
            continue
        seen.add(node)
        if any(order[user] > here for user in node.users):
            return True
        stack.extend(node.users)
    return False


def _copies_out_of_place(graph: fx.Graph) -> int:
    """Rewrite each `aten.copy_(view, src)` (or `aten.fill_(view, value)`) of a graph from
    `torch.export`, where `view` is a chain of slices/selects of a tensor `base` that is no view
    itself (timm's `attn[:, :, i:, j:] = ...`, `rel_indices[:, :, :, 2] = ...`, `t[:, 1:3, 0] = 5.0`),
    as `new = copy_into(base, src, chain)`, and make the nodes after it read `new` instead of
    `base`. The TorchScript exporter turns such in-place writes into ONNX ops that lose or
    misplace the write (mvitv2's relative positions at a dynamic batch, convit's position
    indices). A write is left alone where a value computed from `base` before it (a view, which
    would see the write) is read after it. Returns how many copies were rewritten."""
    aten = torch.ops.aten
    writes = (aten.copy_.default, aten.fill_.Tensor, aten.fill_.Scalar)
    order = {n: i for i, n in enumerate(graph.nodes)}
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in writes or node.users:
            continue
        if len(node.args) != 2 or node.kwargs.get("non_blocking"):
            continue
        chain, view = [], node.args[0]
        while isinstance(view, fx.Node) and _view_step(view) is not None:
            chain.insert(0, _view_step(view))
            view = view.args[0]
        base = view
        if not chain or not isinstance(base, fx.Node) or _view_step(base) is not None:
            continue
        if base.op == "call_function" and getattr(base.target, "_schema", None) is not None and any(
                a.alias_info is not None for a in base.target._schema.returns):
            continue  # base is itself a view (or an in-place result) of another tensor
        if _read_after(base, node, order):
            continue
        here = order[node]
        with graph.inserting_after(node):
            new = graph.call_function(copy_into, (base, node.args[1], tuple(chain)))
        new.meta = dict(base.meta)
        for user in [u for u in base.users if order.get(u, here + 1) > here and u is not new]:
            user.replace_input_with(base, new)
        dst = node.args[0]
        graph.erase_node(node)
        while isinstance(dst, fx.Node) and not dst.users and _view_step(dst) is not None:
            parent = dst.args[0]
            graph.erase_node(dst)
            dst = parent
        order = {n: i for i, n in enumerate(graph.nodes)}
        rewritten += 1
    return rewritten


# ATen calls in graphs unlifted from `torch.export` that take sizes, and the Tensor method or
# torch function with the same arguments. Called as ATen overloads, they make the TorchScript
# tracer record a size read from the input (`x.size(0)`, the batch) as a constant; called
# through Python's argument parser, the size stays a traced shape computation.
_ATEN_AS_METHOD: dict[Any, str] = {}
_ATEN_AS_FUNCTION: dict[Any, Any] = {}


def _aten_tables() -> None:
    aten = torch.ops.aten
    _ATEN_AS_METHOD.update({
        aten.sym_size.int: "size", aten.view.default: "view", aten.reshape.default: "reshape",
        aten._unsafe_view.default: "view", aten.expand.default: "expand", aten.repeat.default: "repeat",
        aten.unflatten.int: "unflatten", aten.new_zeros.default: "new_zeros", aten.new_ones.default: "new_ones",
        aten.new_full.default: "new_full", aten.new_empty.default: "new_empty",
        aten.lift_fresh_copy.default: "clone",  # a tensor constant written in forward(); no ONNX symbolic
    })
    _ATEN_AS_FUNCTION.update({
        aten.zeros.default: torch.zeros, aten.ones.default: torch.ones, aten.full.default: torch.full,
        aten.arange.default: torch.arange, aten.arange.start: torch.arange, aten.arange.start_step: torch.arange,
    })


def _sizes_as_methods(graph: fx.Graph) -> int:
    """Rewrite the size-taking ATen calls of `_ATEN_AS_METHOD`/`_ATEN_AS_FUNCTION` (first of all
    `aten.sym_size.int(x, d)` -> `x.size(d)`), so that a program exported with a dynamic batch
    gives an ONNX file that runs at every batch size. Returns how many calls were rewritten."""
    if not _ATEN_AS_METHOD:
        _aten_tables()
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not (node.target in _ATEN_AS_METHOD or node.target in _ATEN_AS_FUNCTION):
            continue
        args, kwargs = tuple(node.args), dict(node.kwargs)
        if node.target is torch.ops.aten.expand.default:  # `implicit` is not a Tensor.expand argument
            args, _ = args[:2], kwargs.pop("implicit", None)
        with graph.inserting_before(node):
            if node.target in _ATEN_AS_METHOD:
                new = graph.call_method(_ATEN_AS_METHOD[node.target], args, kwargs)
            else:
                new = graph.call_function(_ATEN_AS_FUNCTION[node.target], args, kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        rewritten += 1
    return rewritten


_ADAPTIVE_AVG_POOL2D_FUNCTIONS = (F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d)


def _adaptive_avg_pool2d_targets() -> tuple[Any, ...]:
    aten = torch.ops.aten
    return (*_ADAPTIVE_AVG_POOL2D_FUNCTIONS, aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default)


def _pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in): row i averages input indices [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out)),
    the windows torch's adaptive average pooling uses."""
    m = torch.zeros(n_out, n_in)
    for i in range(n_out):
        start, stop = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, start:stop] = 1.0 / (stop - start)
    return m


def adaptive_avg_pool2d_by_matmul(x: torch.Tensor, in_size: tuple[int, int], out_size: tuple[int, int]) -> torch.Tensor:
    """Adaptive average pooling of an (..., H, W) tensor as P_h @ x @ P_w^T, with the pooling
    windows as constant matrices: ONNX MatMuls, for output sizes that do not divide the input
    (which the TorchScript exporter refuses) - e.g. a VGG/AlexNet head's 7x7 pool at small inputs."""
    rows = _pool_matrix(in_size[0], out_size[0]).to(x.dtype)
    cols = _pool_matrix(in_size[1], out_size[1]).to(x.dtype).t()
    return torch.matmul(torch.matmul(rows, x), cols)


class _InputShapes(fx.Interpreter):
    """Runs the graph once, keeping the input shape of the nodes asked for."""

    def __init__(self, gm: fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(gm)
        self.wanted, self.shapes = wanted, {}

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.wanted and n.args and isinstance(n.args[0], fx.Node):
            self.shapes[n.name] = tuple(self.env[n.args[0]].shape)
        return super().run_node(n)


def _adaptive_pools_as_matmuls(gm: fx.GraphModule, example_input: torch.Tensor) -> int:
    """Replace each 2-D adaptive average pooling whose output size does not divide its input
    size (at the example input's shape) by `adaptive_avg_pool2d_by_matmul`, and spell out
    `None` output sizes (which the exporter refuses) as numbers. Returns how many changed."""
    targets = _adaptive_avg_pool2d_targets()
    candidates: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.AdaptiveAvgPool2d):
            candidates[node.name] = gm.get_submodule(node.target).output_size
        elif node.op == "call_function" and node.target in targets:
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            computed: list[fx.Node] = []
            fx.node.map_arg(size, computed.append)
            if not computed:  # an output size computed in forward() is left to the exporter
                candidates[node.name] = size
    if not candidates:
        return 0
    recorder = _InputShapes(gm, set(candidates))
    with torch.no_grad():
        recorder.run(example_input)
    replaced = 0
    for node in list(gm.graph.nodes):
        shape = recorder.shapes.get(node.name)
        if shape is None or len(shape) < 3:
            continue
        size = candidates[node.name]
        size = (size, size) if isinstance(size, int) else tuple(size)
        in_size = (int(shape[-2]), int(shape[-1]))
        out_size = tuple(in_size[i] if s is None else int(s) for i, s in enumerate(size))
        divides = all(o > 0 and i % o == 0 for i, o in zip(in_size, out_size))
        if divides and None not in size:
            continue  # the exporter writes these as AveragePool / GlobalAveragePool
        with gm.graph.inserting_before(node):
            if divides:  # `None` (keep the input's size) is refused by the exporter: spell it out
                new = gm.graph.call_function(F.adaptive_avg_pool2d, (node.args[0], out_size))
            else:
                new = gm.graph.call_function(adaptive_avg_pool2d_by_matmul, (node.args[0], in_size, out_size))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        replaced += 1
    return replaced


@contextlib.contextmanager
def _exporter_output_discarded() -> Iterator[None]:
    """Discard what the TorchScript exporter writes to the process's stdout/stderr.

    torch 2.13's `setup_onnx_logging` tests a function object for truth, so its C++ ONNX log is
    always on: a failed export dumps the whole TorchScript graph (hundreds of lines) before
    raising. The error it raises is reported instead, in one line."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    with tempfile.TemporaryFile() as sink:
        try:
            for fd in (1, 2):
                os.dup2(sink.fileno(), fd)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy_ in zip((1, 2), saved):
                os.dup2(copy_, fd)
                os.close(copy_)


def export_onnx(
    module: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    opset: int = MIN_OPSET,
    *,
    dynamic_batch: bool = True,
    fold_batchnorm: bool = True,
) -> OnnxExportInfo:
    """Write `module` as ONNX to `path` (opset >= 17, weights inside, checked by onnx.checker).

    `fold_batchnorm=False` keeps BatchNormalization nodes instead of folding them into the
    preceding convolution's weights (quantized weights must reach the file unchanged). Folding
    also reaches a BN behind the constant a slim model adds after a convolution
    (`onnx_bn_fold`).

    A module with packed sparse layers (`rwdeploy.sparse`) is exported through its dense
    equivalent, then every sparse weight is stored compactly (CSR arrays densified by stock
    ops that ONNX Runtime folds at load: `rwdeploy.runtime.onnx_sparse`).
    """
    from rwdeploy.runtime import onnx_sparse

    packed = onnx_sparse.has_packed_layers(module)
    if packed:
        module = onnx_sparse.dense_copy(module)
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} < {MIN_OPSET}")
    path = Path(path)
    exportable = _exportable_copy(module, example_input)
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings(), torch.no_grad(), _exporter_output_discarded():
            # The TorchScript exporter is deprecated in favour of dynamo=True, which cannot pin
            # opset 17; the warning is expected and says nothing about this model.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                exportable,
                (example_input,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
                # EVAL folds Conv+BN in the exporter's peephole pass; PRESERVE (of an eval-mode
                # copy) exports the same computation with the BN kept as its own node.
                training=torch.onnx.TrainingMode.EVAL if fold_batchnorm else torch.onnx.TrainingMode.PRESERVE,
            )
    except Exception as err:  # the exporter raises many kinds for unsupported ops
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OnnxExportError(f"ONNX export failed ({type(err).__name__}: {first})",
                              hint="the slim .pt2 is unaffected; report the op that failed") from None

    model = onnx.load(str(path))
    if packed:
        model, _ = onnx_sparse.compact_onnx(model)
    rewritten = _uniform_constants_as_fills(model)
    rewritten += fold_batchnorm_through_constant_adds(model) if fold_batchnorm else 0
    if model.ir_version > MAX_ORT_IR_VERSION or packed or rewritten:
        model.ir_version = min(model.ir_version, MAX_ORT_IR_VERSION)
        onnx.save(model, str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0]
        raise OnnxExportError(f"exported ONNX file fails onnx.checker ({first})") from None
    opsets = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    return OnnxExportInfo(str(path), opsets[0] if opsets else opset, int(model.ir_version),
                          path.stat().st_size, dynamic_batch)


# Constants at least this large that hold one repeated value are stored as a fill instead.
MIN_FILL_ELEMENTS = 64


def _uniform_constants_as_fills(model: onnx.ModelProto) -> int:
    """Replace every large Constant node holding one repeated value (the ones image the border
    kernels of removed channels are convolved with, which the exporter's constant folding
    materialises once per use) by ConstantOfShape: same tensor, a few bytes in the file.
    ONNX Runtime folds it back at session creation. Returns how many were replaced."""
    nodes, replaced = [], 0
    for node in model.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        arr = numpy_helper.to_array(value) if value is not None and len(node.attribute) == 1 else None
        if arr is None or arr.size < MIN_FILL_ELEMENTS or not (arr == arr.flat[0]).all():
            nodes.append(node)
            continue
        shape_name = f"{node.output[0]}__shape"
        nodes.append(helper.make_node("Constant", [], [shape_name],
                                      value=numpy_helper.from_array(np.array(arr.shape, np.int64), shape_name)))
        nodes.append(helper.make_node("ConstantOfShape", [shape_name], [node.output[0]], name=node.name,
                                      value=numpy_helper.from_array(arr.reshape(-1)[:1].copy())))
        replaced += 1
    if replaced:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return replaced
