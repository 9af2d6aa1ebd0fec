"""Converters for ATen ops that TVM 0.27's Relax importer lacks (`custom_convert_map` entries).

`tvm_build.import_relax` passes `CONVERTERS` to `from_exported_program` for every build, so a
model using one of these ops builds for every TVM target. Keys are the ops' names after
torch's core-ATen decomposition (which the importer runs first); each converter takes
`(fx.Node, importer)` and returns the Relax value of the node.

Adding an op: one function here (built from Relax ops, exact against torch) and one
`CONVERTERS` entry, tested against torch in tests/test_tvm_convert.py on inputs of more than
one shape.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx

from rwdeploy.errors import TvmImportError

Converter = Callable[[fx.Node, Any], Any]  # (fx.Node, importer) -> relax.Var


def _static_dims(x: Any, node: fx.Node) -> list[int]:
    dims = []
    for d in x.ty.shape:
        if not isinstance(getattr(d, "value", None), int):
            raise TvmImportError(f"{node.target} at node {node.name!r} needs a static input shape, got {x.ty.shape}",
                                 hint="build at a fixed input size", node=node.name)
        dims.append(int(d.value))
    return dims


def _only_first_output_used(node: fx.Node) -> None:
    """Ops returning (values, indices): the converters compute the values; a graph that reads
    the indices (return_indices=True) is refused rather than given made-up ones."""
    for user in node.users:
        if not (user.op == "call_function" and getattr(user.target, "__name__", "") == "getitem"
                and user.args[1] == 0):
            raise TvmImportError(f"{node.target} at node {node.name!r}: the indices output is used, "
                                 "which rwdeploy's converter does not compute",
                                 hint="compile with --target onnx, or pool without return_indices", node=node.name)


def adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """torch's adaptive pooling windows along one axis: [floor(i*size/out), ceil((i+1)*size/out))."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def _adaptive_max_axis(bb: Any, x: Any, axis: int, size: int, out: int) -> Any:
    """Adaptive max pooling along one axis: the max of each window, concatenated."""
    from tvm import relax

    if out == size:
        return x
    parts = [bb.emit(relax.op.max(relax.op.strided_slice(x, axes=[axis], begin=[lo], end=[hi]),
                                  axis=[axis], keepdims=True)) for lo, hi in adaptive_bins(size, out)]
    return bb.emit(relax.op.concat(parts, axis=axis)) if len(parts) > 1 else parts[0]


def adaptive_max_pool2d(node: fx.Node, importer: Any) -> Any:
    """`aten.adaptive_max_pool2d(x, output_size) -> (values, indices)`, values only.

    An output size that divides the input is a max_pool2d with kernel = stride = input/output
    (the scheduled pooling kernel). Otherwise each output element is the max over torch's
    window, which may overlap its neighbour's; max is separable, so the rows' windows are
    reduced first, then the columns' (out_h + out_w slices, not out_h * out_w).
    """
    from tvm import relax

    _only_first_output_used(node)
    bb, x = importer.block_builder, importer.env[node.args[0]]
    dims = _static_dims(x, node)
    h, w = dims[-2:]
    oh, ow = (size if size is not None else full for size, full in zip(node.args[1], (h, w)))
    if h % oh == 0 and w % ow == 0:
        kernel = (h // oh, w // ow)
        batched = x if len(dims) == 4 else bb.emit(relax.op.expand_dims(x, axis=0))
        y = bb.emit(relax.op.nn.max_pool2d(batched, pool_size=kernel, strides=kernel, layout="NCHW"))
        y = y if len(dims) == 4 else bb.emit(relax.op.squeeze(y, axis=[0]))
    else:
        y = _adaptive_max_axis(bb, _adaptive_max_axis(bb, x, len(dims) - 2, h, oh), len(dims) - 1, w, ow)
    return bb.emit(relax.Tuple([y]))


def amax(node: fx.Node, importer: Any) -> Any:
    """`aten.amax(x, dim=[], keepdim=False)`: the max over `dim` (all dims when empty), e.g. from
    `x.amax((2, 3))` global max pooling and `torch.logsumexp`."""
    from tvm import relax

    x = importer.env[node.args[0]]
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", [])
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return importer.block_builder.emit(relax.op.max(x, axis=list(dims) or None, keepdims=bool(keepdim)))


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _one_hot_taps(channels: int, kh: int, kw: int) -> Any:
    """(C*kh*kw, 1, kh, kw) weights picking tap (i, j) of channel c into row c*kh*kw + i*kw + j:
    im2col's row order, as a grouped conv (groups = C) or its transpose."""
    import numpy as np

    w = np.zeros((channels * kh * kw, 1, kh, kw), dtype="float32")
    for c in range(channels):
        for i in range(kh):
            for j in range(kw):
                w[(c * kh + i) * kw + j, 0, i, j] = 1.0
    return w


def im2col(node: fx.Node, importer: Any) -> Any:
    """`aten.im2col(x, kernel_size, dilation, padding, stride)` (F.unfold): a grouped conv with
    one-hot kernels, then the spatial dims flattened. torch's core-ATen decomposition turns it
    into advanced indexing that TVM 0.27's importer cannot broadcast (VOLO, T2T-ViT)."""
    from tvm import relax

    bb, x = importer.block_builder, importer.env[node.args[0]]
    n, c, _, _ = _static_dims(x, node)
    (kh, kw), dil, pad, stride = (_pair(a) for a in node.args[1:5])
    y = bb.emit(relax.op.nn.conv2d(x, relax.const(_one_hot_taps(c, kh, kw)), strides=stride, padding=pad,
                                   dilation=dil, groups=c))
    return bb.emit(relax.op.reshape(y, (n, c * kh * kw, -1)))


def col2im(node: fx.Node, importer: Any) -> Any:
    """`aten.col2im(x, output_size, kernel_size, dilation, padding, stride)` (F.fold), the
    overlap-add inverse of im2col: a grouped transposed conv with the same one-hot kernels."""
    from tvm import relax

    bb, x = importer.block_builder, importer.env[node.args[0]]
    n, rows, _ = _static_dims(x, node)
    (oh, ow), (kh, kw), dil, pad, stride = (_pair(a) for a in node.args[1:6])
    c = rows // (kh * kw)
    bh = (oh + 2 * pad[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1  # blocks along H and W
    bw = (ow + 2 * pad[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    cols = bb.emit(relax.op.reshape(x, (n, rows, bh, bw)))
    full_h = (bh - 1) * stride[0] - 2 * pad[0] + dil[0] * (kh - 1) + 1
    full_w = (bw - 1) * stride[1] - 2 * pad[1] + dil[1] * (kw - 1) + 1
    return bb.emit(relax.op.nn.conv2d_transpose(
        cols, relax.const(_one_hot_taps(c, kh, kw)), strides=stride, padding=pad,
        output_padding=(oh - full_h, ow - full_w), dilation=dil, groups=c))


def unfold(node: fx.Node, importer: Any) -> Any:
    """`aten.unfold(x, dim, size, step)` (`Tensor.unfold`, HaloNet's halo windows): window i
    along `dim` becomes index i there, its `size` elements a new last axis. Built as `size`
    strided slices (element k of every window) stacked on that axis."""
    from tvm import relax

    bb, x = importer.block_builder, importer.env[node.args[0]]
    dims = _static_dims(x, node)
    dim, size, step = (int(a) for a in node.args[1:4])
    dim = dim % len(dims) if dims else 0
    if not dims:  # a 0-d tensor unfolds to shape (size,) = (1,)
        return bb.emit(relax.op.reshape(x, (1,)))
    windows = (dims[dim] - size) // step + 1
    taps = [bb.emit(relax.op.strided_slice(x, axes=[dim], begin=[k], end=[k + (windows - 1) * step + 1],
                                           strides=[step])) for k in range(size)]
    return bb.emit(relax.op.stack(taps, axis=len(dims)))


CONVERTERS: dict[str, Converter] = {
    "adaptive_max_pool2d.default": adaptive_max_pool2d,
    "amax.default": amax,
    "im2col.default": im2col,
    "col2im.default": col2im,
    "unfold.default": unfold,
}
# Ops the importer's core-ATen decomposition would take apart before a converter sees them.
KEEP_UNDECOMPOSED = ("im2col.default", "col2im.default")
