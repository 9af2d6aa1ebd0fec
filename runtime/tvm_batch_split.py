"""Run the first layers of a batched network one image at a time where the batch's tensors
do not fit in the last-level cache.

At batch 8 MobileNetV2's 112x112 and 56x56 layers write tensors of 10-40 MB (the 16->96
expansion: 8 x 112 x 112 x 96 floats, 38.5 MB) into a 32 MB L3, and the next layer reads them
back from DRAM: those layers ran at 5-37 GFMA/s against ~55 for the 14x14 ones, and the TVM
build lost to ONNX Runtime (67 vs 59 ms). One image's tensors (4.8 MB) stay in cache.

`batch_split_pass(cache_bytes)` rewrites `main` (a Relax function of one batched tensor
input, after `tvm_schedule.prepare_passes`): its leading layers, while they are only
batch-independent ops (convs, elementwise ops, pooling, channel slices, an NHWC transpose, the
tuple and getitem of a decomposed batch norm),
run once per image on a slice of the input, up to a *cut*: the first point after the last
tensor of at least `cache_bytes / 4` at which one tensor carries everything forward (a
smaller one: it is concatenated in memory). The
images' results are concatenated there and the rest runs batched, where it is efficient.
The function is the same; the kernels of the split part are the batch-1 ones.
"""
from __future__ import annotations

import math
import os
from typing import Any

# Ops that compute each image from that image alone whatever their attributes (the batch is
# never an attribute of theirs), so re-emitting them on a one-image slice is the same function.
PER_IMAGE_OPS = frozenset({
    "relax.nn.conv2d", "relax.add", "relax.subtract", "relax.multiply", "relax.divide",
    "relax.maximum", "relax.minimum", "relax.clip", "relax.nn.relu", "relax.nn.silu",
    "relax.sigmoid", "relax.nn.max_pool2d", "relax.nn.avg_pool2d",
})
CACHE_FRACTION = 8   # split while a batch tensor is at least this fraction of the cache
_LAYERS = ("relax.nn.conv2d", "relax.nn.max_pool2d", "relax.nn.avg_pool2d")
_BROADCASTING = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum",
                 "relax.minimum")


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """This machine's largest CPU cache (Linux sysfs), else `default`."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        return default
    return best or default


def _per_image(call: Any) -> bool:
    import tvm

    if not isinstance(call, tvm.ir.Call) or not isinstance(call.op, tvm.ir.Op):
        return False
    name = call.op.name
    if name == "relax.permute_dims":
        return call.attrs.axes is not None and int(call.attrs.axes[0]) == 0
    if name == "relax.strided_slice":   # args: data, axes, begin, end (tuples of PrimValues)
        return all(int(a.value) != 0 for a in call.args[1].fields)
    return name in PER_IMAGE_OPS


def _tensor_bytes(ty: Any) -> int | None:
    shape = getattr(ty, "shape", None)
    if shape is None or not all(hasattr(d, "value") or isinstance(d, int) for d in shape):
        return None
    return math.prod(int(d) for d in shape) * 4


def split_point(func: Any, cache_bytes: int) -> int | None:
    """Index of the cut binding in `func`'s first dataflow block, or None (no split pays or
    is possible)."""
    import tvm
    from tvm import relax

    if len(func.params) != 1 or not isinstance(func.body, relax.SeqExpr) or not func.body.blocks:
        return None
    x = func.params[0]
    shape = getattr(x.ty, "shape", None)
    if shape is None or len(shape) < 2 or int(shape[0]) < 2:
        return None
    batch = int(shape[0])
    bindings = list(func.body.blocks[0].bindings)
    defined = {x}
    prefix = 0   # bindings [0, prefix) are per-image ops on x and earlier prefix values

    def splittable(a: Any, broadcasting: bool) -> bool:
        """An operand: the input, an earlier split value, or a constant without a batch axis
        of its own (a (B, ...) constant would broadcast one image back to B)."""
        if isinstance(a, relax.Var):
            return a in defined
        if not isinstance(a, tvm.ir.expr.Constant):
            return False
        dims = getattr(a.ty, "shape", None) or []
        return not broadcasting or len(dims) < len(shape) or int(dims[0]) == 1

    for b in bindings:
        value = b.value
        if isinstance(value, relax.Tuple):      # e.g. a decomposed batch norm's (y, mean, var)
            if not all(splittable(f, True) for f in value.fields):
                break
        elif isinstance(value, relax.TupleGetItem):
            if value.tuple_value not in defined:
                break
        else:
            if not _per_image(value) or not all(
                    splittable(a, value.op.name in _BROADCASTING)
                    for a in value.args if isinstance(getattr(a, "ty", None), relax.TensorType)):
                break
            out = getattr(b.var.ty, "shape", None)
            if out is None or int(out[0]) != batch or _tensor_bytes(b.var.ty) is None:
                break
        defined.add(b.var)
        prefix += 1
    threshold = cache_bytes // CACHE_FRACTION
    large = [i for i in range(prefix) if (_tensor_bytes(bindings[i].var.ty) or 0) >= threshold]
    if not large:
        return None
    # uses of each prefix value after each point: a cut must leave exactly one value live
    last_use: dict[Any, int] = {}
    for i, b in enumerate(bindings):
        for v in relax.analysis.free_vars(b.value):
            last_use[v] = i
    for v in relax.analysis.free_vars(func.body.body):
        last_use[v] = len(bindings)
    def single_live(k: int) -> bool:
        live = [b.var for b in bindings[:k + 1] if last_use.get(b.var, -1) > k]
        return live == [bindings[k].var] and last_use.get(x, -1) <= k

    # the batch's result at the cut is concatenated in memory: past the last large tensor,
    # and past the elementwise ops after it (bias, activation), which fuse with their conv
    cut = next((k for k in range(large[-1] + 1, prefix) if single_live(k)), None)
    while cut is not None and cut + 1 < prefix and single_live(cut + 1) \
            and getattr(getattr(bindings[cut + 1].value, "op", None), "name", "") not in _LAYERS:
        cut += 1
    return cut


def split_batch(func: Any, cut: int) -> Any:
    """`func` with bindings [0, cut] run once per image and concatenated at the cut."""
    import tvm
    from tvm import relax

    x = func.params[0]
    batch = int(x.ty.shape[0])
    block = func.body.blocks[0]
    bindings = list(block.bindings)
    bb = relax.BlockBuilder()
    new: list[Any] = []

    def bind(value: Any, name: str) -> Any:
        value = bb.normalize(value)
        var = relax.DataflowVar(name, value.ty)
        new.append(relax.VarBinding(var, value))
        return var

    outs = []
    for i in range(batch):
        mapping = {x: bind(relax.op.strided_slice(x, axes=[0], begin=[i], end=[i + 1]), f"image{i}")}
        for b in bindings[:cut + 1]:
            value = b.value
            if isinstance(value, relax.Tuple):
                value = relax.Tuple([mapping.get(f, f) for f in value.fields])
            elif isinstance(value, relax.TupleGetItem):
                value = relax.TupleGetItem(mapping[value.tuple_value], value.index)
            else:
                args = [mapping.get(a, a) if isinstance(a, relax.Var) else a for a in value.args]
                value = tvm.ir.Call(value.op, args, value.attrs, value.ty_args)
            mapping[b.var] = bind(value, f"{b.var.name}_i{i}")
        outs.append(mapping[bindings[cut].var])
    cut_var = bindings[cut].var
    new.append(relax.VarBinding(cut_var, bb.normalize(relax.op.concat(outs, axis=0))))
    new.extend(bindings[cut + 1:])
    body = relax.SeqExpr([relax.DataflowBlock(new), *func.body.blocks[1:]], func.body.body)
    return relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)


def batch_split_pass(cache_bytes: int) -> Any:
    """The module pass: `main` split where `split_point` finds a cut, else unchanged."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="rwdeploy.BatchSplit")
    def rewrite(mod: Any, _ctx: Any) -> Any:
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function) and gvar.name_hint == "main":
                cut = split_point(func, cache_bytes)
                if cut is not None:
                    mod = mod.__class__({**{g: f for g, f in mod.functions_items()},
                                         gvar: split_batch(func, cut)}, attrs=mod.attrs)
        return mod

    return rewrite
