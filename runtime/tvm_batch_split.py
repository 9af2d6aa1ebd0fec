"""Run the first layers of a batched network one image at a time where the batch's tensors
do not fit in the core's cache.

At batch 8 MobileNetV2's 112x112 and 56x56 layers write tensors of 10-40 MB (the 16->96
expansion: 8 x 112 x 112 x 96 floats, 38.5 MB), and the next layer read them back from memory:
those layers ran at 5-37 GFMA/s against ~55 for the 14x14 ones, and the TVM build lost to ONNX
Runtime (67 vs 59 ms). One image's tensors (4.8 MB) stay in cache.

`batch_split_pass(core_cache)` rewrites `main` (a Relax function of one batched tensor input,
after `tvm_schedule.prepare_passes`): its leading layers, while they are only batch-independent
ops (convs, elementwise ops, pooling, channel slices, an NHWC transpose, the tuple and getitem of
a decomposed batch norm), run once per image on a slice of the input, up to a *cut*: the first
point after the last *large* tensor at which one tensor carries everything forward (a smaller
one: it is concatenated in memory). The images' results are concatenated there and the rest
runs batched, where it is efficient. The function is the same; the kernels of the split part
are the batch-1 ones.

What is large is measured against the core's own cache (L2), in tiers (`LARGE_TENSOR_TIERS`):
half of it first, where the layers then keep one image's working set in L2, else twice it,
where the first tier finds no cut. At batch 8 on the Xeon (2 MB L2), `pass_ablation.py --pass
batch-split-tiers`: slim MobileNetV2 70 % runs per image down to its 7x7 stage (41 convs
against 11) in 0.961x the time, dense ResNet-18 down to 14x14 (8 convs against 1) in 0.964x;
dense MobileNetV2's tensors stay large to its last stage, so its second tier's cut (14x14) stays
(all of it per image was 1.025x, scratch).
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
# a batch tensor is large from these multiples of the core's cache: the first tier with a cut
LARGE_TENSOR_TIERS = (0.5, 2.0)
# a cut pays its copies (the input's slices, the concatenation) and the per-image kernel calls
# only where several layers keep their tensors in cache: slim ResNet-18 70 % at batch 8 with
# its stem alone per image (a 1.9 MB output) ran 1.025x the time of no split
MIN_CONVS_PER_IMAGE = 2
SYSFS_CACHES = "/sys/devices/system/cpu/cpu0/cache"
_LAYERS = ("relax.nn.conv2d", "relax.nn.max_pool2d", "relax.nn.avg_pool2d")
_BROADCASTING = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum",
                 "relax.minimum")


def _sysfs_value(base: str, entry: str, name: str) -> str:
    with open(os.path.join(base, entry, name)) as f:
        return f.read().strip().upper()


def core_cache_bytes(default: int = 2 << 20, base: str = SYSFS_CACHES) -> int:
    """The size of this machine's level-2 cache (data or unified, per core; Linux sysfs),
    else `default`. Entries of `base` that are not cache indices (`uevent`) are skipped: the
    earlier reader of the largest cache stopped at that file and returned its default."""
    best = 0
    try:
        entries = os.listdir(base)
    except OSError:
        return default
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    for entry in entries:
        if not entry.startswith("index"):
            continue
        try:
            if int(_sysfs_value(base, entry, "level")) != 2 or _sysfs_value(base, entry, "type") == "INSTRUCTION":
                continue
            size = _sysfs_value(base, entry, "size")
            best = max(best, int(size.rstrip("KMG")) * scale.get(size[-1:], 1))
        except (OSError, ValueError):
            continue
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


def split_point(func: Any, large_bytes: int) -> int | None:
    """Index of the cut binding in `func`'s first dataflow block, tensors of `large_bytes` or
    more counting as large, or None (nothing large, or no cut after the last large tensor)."""
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
    large = [i for i in range(prefix) if (_tensor_bytes(bindings[i].var.ty) or 0) >= large_bytes]
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


def choose_cut(func: Any, core_cache: int) -> int | None:
    """The cut of the first tier of `LARGE_TENSOR_TIERS` (x `core_cache` bytes) that has one
    leaving at least `MIN_CONVS_PER_IMAGE` convs per image."""
    bindings = list(func.body.blocks[0].bindings) if getattr(func.body, "blocks", None) else []
    for tier in LARGE_TENSOR_TIERS:
        cut = split_point(func, int(tier * core_cache))
        if cut is not None and convs_through(bindings, cut) >= MIN_CONVS_PER_IMAGE:
            return cut
    return None


def convs_through(bindings: list[Any], cut: int) -> int:
    """The conv2d bindings among `bindings[0..cut]`: the layers a cut runs per image."""
    return sum(getattr(getattr(b.value, "op", None), "name", "") == "relax.nn.conv2d"
               for b in bindings[:cut + 1])


def batch_split_pass(core_cache: int) -> Any:
    """The module pass: `main` split where `choose_cut` finds a cut, else unchanged."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="rwdeploy.BatchSplit")
    def rewrite(mod: Any, _ctx: Any) -> Any:
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function) and gvar.name_hint == "main":
                cut = choose_cut(func, core_cache)
                if cut is not None:
                    mod = mod.__class__({**{g: f for g, f in mod.functions_items()},
                                         gvar: split_batch(func, cut)}, attrs=mod.attrs)
        return mod

    return rewrite
