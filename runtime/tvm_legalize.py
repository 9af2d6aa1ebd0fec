"""Convolutions and dense layers with constant weights, lowered for CPUs with packed weights.

TVM's default legalisation turns `conv2d(NHWC, HWIO)` and `matmul` into TOPI computes that read
the weight in its given layout: for an output-channel tile of T lanes, consecutive reduction
steps read T floats that lie a whole row of output channels apart (2 KiB for 512 channels), so
large weights stream from memory in scattered pieces, and a padding stage copies the whole
input on every call, also for 1x1 convolutions that pad nothing. Here the weight is packed at
compile time (it is a constant) so that the schedule's access order is the storage order:

* conv2d, groups 1: HWIO -> (CO/T, KH, KW, CI, T) ("OHWI{T}o"), out[n, h, w, o] =
  sum pad(x)[n, h*s + rh*d, w*s + rw*d, c] * W[o // T, rh, rw, c, o % T];
* depthwise conv2d (groups = channels): the HWIO weight is already channel-innermost;
* dense (matmul with a constant 2-D right operand (K, N)): -> (N/T, K, T); where no register
  tile of 4 rows or more divides the row count (197 tokens), the rows are zero-padded to a
  multiple of 8 and the extra ones dropped after (`padded_rows`);
* matmul of two computed operands (attention) whose output columns no vector of 4 or more
  lanes divides: the columns padded to whole vectors (`batch_matmul_padded`).

T is the channel tile of `tvm_schedule.register_tile` for the layer's output shape, the tile
`ScheduleCPU` splits the output channels by, so that one tile's weights are one contiguous block
(or one vector of it, where the weights are streamed: `tvm_schedule.weight_block`). Padding is a separate stage
only where there is some (the schedule inlines or places it); none for unpadded convolutions.
Anything else (grouped convs, dilation in the weight, other layouts, non-constant weights)
keeps TVM's default legalisation.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

# The compute stages' names: the schedule recognises the stages by them (they live there so
# that the schedule need not import this module).
from rwdeploy.runtime.tvm_fold import constant_value, static_shape
from rwdeploy.runtime.tvm_schedule import CONV, DENSE, DEPTHWISE, PAD, STAGES  # noqa: F401


def pack_conv_weight(weight_hwio: np.ndarray, tile: int) -> np.ndarray:
    """(KH, KW, CI, CO) -> (CO/tile, KH, KW, CI, tile); `tile` divides CO."""
    kh, kw, ci, co = weight_hwio.shape
    return np.ascontiguousarray(weight_hwio.reshape(kh, kw, ci, co // tile, tile).transpose(3, 0, 1, 2, 4))


def pack_dense_weight(weight_kn: np.ndarray, tile: int) -> np.ndarray:
    """(K, N) -> (N/tile, K, tile); `tile` divides N."""
    k, n = weight_kn.shape
    return np.ascontiguousarray(weight_kn.reshape(k, n // tile, tile).transpose(1, 0, 2))


def _pad_nhwc(data: Any, padding: tuple[int, int, int, int], channels: int | None = None) -> Any:
    """Zero padding (top, left, bottom, right) of an NHWC tensor, and zero channels up to
    `channels`; `data` when there is neither."""
    from tvm import te, tirx

    top, left, bottom, right = padding
    n, h, w, c = data.shape
    channels = int(c) if channels is None else channels
    if not any(padding) and channels == int(c):
        return data

    def value(i: Any, y: Any, x: Any, ch: Any) -> Any:
        inside = [y >= top, y < h + top, x >= left, x < w + left]
        if channels > int(c):
            inside.append(ch < c)
        return tirx.if_then_else(tirx.all(*inside), data[i, y - top, x - left, ch], tirx.const(0.0, data.dtype))

    return te.compute((n, h + top + bottom, w + left + right, channels), value, name=PAD)


def _out_size(size: Any, kernel: int, stride: int, dilation: int, before: int, after: int) -> Any:
    return (size + before + after - (kernel - 1) * dilation - 1) // stride + 1


def conv2d_nhwc_packed(data: Any, packed: Any, strides: tuple[int, int], padding: tuple[int, int, int, int],
                       dilation: tuple[int, int], data_layout: str = "NHWC") -> Any:
    """NHWC convolution with a (CO/T, KH, KW, CI', T) packed weight; CI' > CI (zero weights,
    `tvm_schedule.streamed_reduction`) pads the input with zero channels to match. An NCHW
    `data` is read through an NHWC view (`tvm_input_layout`)."""
    from tvm import te

    if data_layout == "NCHW":
        from rwdeploy.runtime.tvm_input_layout import nhwc_view

        data = nhwc_view(data)
    n, h, w, _ = data.shape
    co_tiles, kh, kw, ci, tile = (int(v) for v in packed.shape)
    (sh, sw), (dh, dw) = strides, dilation
    oh = _out_size(h, kh, sh, dh, padding[0], padding[2])
    ow = _out_size(w, kw, sw, dw, padding[1], padding[3])
    padded = _pad_nhwc(data, padding, ci)
    rh, rw, rc = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw"), te.reduce_axis((0, ci), "rc")
    return te.compute(
        (n, oh, ow, co_tiles * tile),
        lambda i, y, x, o: te.sum(padded[i, y * sh + rh * dh, x * sw + rw * dw, rc]
                                  * packed[o // tile, rh, rw, rc, o % tile], axis=[rh, rw, rc]),
        name=CONV)


def depthwise_conv2d_nhwc(data: Any, weight: Any, strides: tuple[int, int], padding: tuple[int, int, int, int],
                          dilation: tuple[int, int]) -> Any:
    """NHWC depthwise convolution (one filter per channel) with an HWIO (KH, KW, 1, C) weight."""
    from tvm import te

    n, h, w, c = data.shape
    kh, kw = int(weight.shape[0]), int(weight.shape[1])
    (sh, sw), (dh, dw) = strides, dilation
    oh = _out_size(h, kh, sh, dh, padding[0], padding[2])
    ow = _out_size(w, kw, sw, dw, padding[1], padding[3])
    padded = _pad_nhwc(data, padding)
    rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
    return te.compute(
        (n, oh, ow, c),
        lambda i, y, x, ch: te.sum(padded[i, y * sh + rh * dh, x * sw + rw * dw, ch] * weight[rh, rw, 0, ch],
                                   axis=[rh, rw]),
        name=DEPTHWISE)


def dense_packed(data: Any, packed: Any) -> Any:
    """(B, K) x packed (N/T, K, T) -> (B, N)."""
    from tvm import te

    b, k = data.shape
    tiles, _, tile = (int(v) for v in packed.shape)
    rk = te.reduce_axis((0, k), "rk")
    return te.compute((b, tiles * tile), lambda i, o: te.sum(data[i, rk] * packed[o // tile, rk, o % tile], axis=rk),
                      name=DENSE)


def dense_packed_rows(data: Any, packed: Any, rows: int) -> Any:
    """`dense_packed` on `data` zero-padded to `rows` rows, then its first rows kept."""
    from tvm import te, tirx

    b, k = data.shape
    padded = te.compute((rows, k), lambda i, c: tirx.if_then_else(
        i < b, data[tirx.min(i, b - 1), c], tirx.const(0.0, data.dtype)), name="rows_padded")
    y = dense_packed(padded, packed)
    return te.compute((b, y.shape[1]), lambda i, o: y[i, o], name="rows_kept")


def padded_rows(rows: int, channels: int, lanes: int, registers: int, weight_bytes: int) -> int:
    """The row count a dense layer is computed at: `rows`, or where no register tile of 4 rows
    or more divides it (ViT's 197 tokens, a prime: 1-row tiles, one FMA per weight vector
    loaded), the next multiple of 8."""
    from rwdeploy.runtime.tvm_schedule import register_tile

    if rows <= 8 or register_tile([rows], channels, lanes, registers, weight_bytes).pixels[0] >= 4:
        return rows
    return -(-rows // 8) * 8


def batch_matmul_padded(a: Any, b: Any, rows: int, cols: int) -> Any:
    """a (..., M, K) x b (..., K, N), same batch dims, computed at `rows` x `cols` (b's columns
    zero-padded in a copy where `cols` > N, a's extra rows read as its last row), then the
    (M, N) part kept."""
    from tvm import te, tirx

    *batch, m, k = (int(v) for v in a.shape)
    n = int(b.shape[-1])
    bp = b if cols == n else te.compute((*batch, k, cols), lambda *i: tirx.if_then_else(
        i[-1] < n, b[(*i[:-1], tirx.min(i[-1], n - 1))], tirx.const(0.0, b.dtype)), name="cols_padded")
    rk = te.reduce_axis((0, k), "rk")
    y = te.compute((*batch, rows, cols), lambda *i: te.sum(
        a[(*i[:-2], tirx.min(i[-2], m - 1), rk)] * bp[(*i[:-2], rk, i[-1])], axis=rk), name="matmul_padded")
    return te.compute((*batch, m, n), lambda *i: y[i], name="matmul_kept")


def _padded_extents(rows: int, cols: int, lanes: int) -> tuple[int, int] | None:
    """(rows, cols) to compute a matmul's output at, or None to leave it as it is: columns
    that no vector of 4 or more lanes divides (197 attention scores per row: scalar code,
    3.6 ms against 0.15 for the next matmul of the same size) go up to a multiple of `lanes`,
    rows that no tile of 4 or more divides (197 tokens: 1-row tiles, 4 accumulators where the
    FMA latency wants 16; ViT-Tiny's scores @ v at 42 GMAC/s) to a multiple of 8."""
    from rwdeploy.runtime.tvm_schedule import pixel_tile, vector_width

    padded_cols = cols if cols < lanes or vector_width(cols, lanes) >= 4 else -(-cols // lanes) * lanes
    padded_rows = rows if rows <= 8 or pixel_tile([rows], 8)[0] >= 4 else -(-rows // 8) * 8
    return None if (padded_rows, padded_cols) == (rows, cols) else (padded_rows, padded_cols)


def _ints(values: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _float32(call: Any) -> bool:
    return all(getattr(a.ty, "dtype", None) == "float32" for a in call.args) and call.ty.dtype == "float32"


def _padding(attrs: Any) -> tuple[int, int, int, int]:
    padding = _ints(attrs.padding)
    return (*padding, *padding) if len(padding) == 2 else padding


def conv2d_legalizer(lanes: int, registers: int, unit: int | None = None) -> Callable[[Any, Any], Any]:
    """`relax.nn.conv2d` -> packed conv / depthwise conv / pixel-vectorised NCHW conv
    (`tvm_pixel_conv`, the convs `nhwc_or_as_given_pass` kept NCHW for it) where it applies,
    else TVM's default."""
    from tvm.relax.transform.legalize_ops import nn as default_nn

    from rwdeploy.runtime.tvm_pixel_conv import (_row_width, conv2d_nchw_flat, conv2d_nchw_pixels,
                                                 pixel_candidate, tiled_channels, uses_flat_map)
    from rwdeploy.runtime.tvm_row_winograd import (choose_row_winograd, conv2d_nchw_row_winograd,
                                                   transform_row_weight)
    from rwdeploy.runtime.tvm_schedule import padded_width, register_tile, streamed_reduction, weight_block
    from rwdeploy.runtime.tvm_winograd import choose_winograd, conv2d_nhwc_winograd, gemm_rows, transform_weight

    def channel_width(channels: int) -> int:
        return padded_width(channels, lanes, unit)

    def legalize(bb: Any, call: Any) -> Any:
        attrs = call.attrs
        weight = constant_value(call.args[1])
        out_shape = static_shape(call)
        if weight is not None and _float32(call) and pixel_candidate(call, lanes, channel_width) is not None:
            from tvm import relax

            co = weight.shape[0]
            computed = tiled_channels(co)
            if computed > co:
                weight = np.concatenate([weight, np.zeros((computed - co, *weight.shape[1:]), weight.dtype)])
            flat = uses_flat_map(out_shape[2], out_shape[3], lanes, co)
            strides = _ints(attrs.strides)
            minimal = choose_row_winograd(weight.shape[2:], strides, _ints(attrs.dilation), out_shape[2],
                                          out_shape[3], lanes, flat)
            if minimal is not None:
                return bb.call_te(conv2d_nchw_row_winograd, call.args[0],
                                  relax.const(transform_row_weight(weight, minimal)), _padding(attrs),
                                  _row_width(out_shape[3], lanes), co, minimal.m, flat,
                                  primfunc_name_hint="conv2d_row_winograd")
            return bb.call_te(conv2d_nchw_flat if flat else conv2d_nchw_pixels, call.args[0], relax.const(weight),
                              strides, _padding(attrs), lanes, co,
                              primfunc_name_hint="conv2d_pixels_flat" if flat else "conv2d_pixels")
        groups = int(attrs.groups)
        # NCHW in, NHWC out: a few-channel input read in place of a transpose (`tvm_input_layout`)
        data_layout = "NCHW" if attrs.data_layout == "NCHW" and groups == 1 else "NHWC"
        if (weight is None or out_shape is None or not _float32(call) or attrs.data_layout != data_layout
                or attrs.kernel_layout != "HWIO" or attrs.out_layout != "NHWC"):
            return default_nn._nn_conv2d(bb, call)
        kh, kw, ci_per_group, co = weight.shape
        strides, dilation, padding = _ints(attrs.strides), _ints(attrs.dilation), _padding(attrs)
        from tvm import relax

        minimal = choose_winograd(weight.shape, strides, dilation, groups, lanes, out_shape) \
            if data_layout == "NHWC" else None
        if minimal is not None:
            tile = register_tile(gemm_rows(minimal, *out_shape[:3]), co, lanes, registers)
            packed = relax.const(transform_weight(weight, weight_block(tile, 0, lanes), minimal))
            return bb.call_te(conv2d_nhwc_winograd, call.args[0], packed, padding, minimal.m,
                              primfunc_name_hint="conv2d_winograd")
        if groups == 1:
            tile = register_tile(out_shape[:-1], co, lanes, registers, weight.size * 4)
            inputs = streamed_reduction(ci_per_group, weight.size * 4, lanes)
            if inputs > ci_per_group:
                weight = np.pad(weight, ((0, 0), (0, 0), (0, inputs - ci_per_group), (0, 0)))
            packed = relax.const(pack_conv_weight(weight, weight_block(tile, weight.size * 4, lanes)))
            return bb.call_te(conv2d_nhwc_packed, call.args[0], packed, strides, padding, dilation,
                              data_layout, primfunc_name_hint="conv2d")
        if ci_per_group == 1 and groups == co:
            return bb.call_te(depthwise_conv2d_nhwc, call.args[0], call.args[1], strides, padding, dilation,
                              primfunc_name_hint="depthwise_conv2d")
        return default_nn._nn_conv2d(bb, call)

    return legalize


def matmul_legalizer(lanes: int, registers: int) -> Callable[[Any, Any], Any]:
    """`relax.matmul(x[B, K], W[K, N])` with a constant W -> packed dense; two computed operands
    whose output columns no vector divides, or rows no tile of 4 divides -> `batch_matmul_padded`;
    else TVM's default."""
    from tvm.relax.transform.legalize_ops import linear_algebra as default_la

    from rwdeploy.runtime.tvm_schedule import register_tile, weight_block

    def legalize(bb: Any, call: Any) -> Any:
        from tvm import relax

        weight = constant_value(call.args[1])
        out_shape = static_shape(call)
        if weight is None and out_shape is not None and _float32(call):
            shapes = [static_shape(arg) for arg in call.args]
            if None not in shapes and len(shapes[0]) == len(shapes[1]) >= 2 and shapes[0][:-2] == shapes[1][:-2]:
                padded = _padded_extents(out_shape[-2], out_shape[-1], lanes)
                if padded is not None:
                    return bb.call_te(batch_matmul_padded, call.args[0], call.args[1], *padded,
                                      primfunc_name_hint="matmul")
        if weight is None or weight.ndim != 2 or out_shape is None or len(out_shape) != 2 or not _float32(call):
            return default_la._matmul(bb, call)
        rows = padded_rows(out_shape[0], weight.shape[1], lanes, registers, weight.size * 4)
        tile = register_tile([rows], weight.shape[1], lanes, registers, weight.size * 4)
        packed = relax.const(pack_dense_weight(weight, weight_block(tile, weight.size * 4, lanes)))
        if rows != out_shape[0]:
            return bb.call_te(dense_packed_rows, call.args[0], packed, rows, primfunc_name_hint="dense")
        return bb.call_te(dense_packed, call.args[0], packed, primfunc_name_hint="dense")

    return legalize


def legalize_passes(target: Any) -> list[Any]:
    """TVM's CPU legalisation passes, with conv2d and matmul lowered as above, NCHW max
    pooling as in `tvm_pool`, exp-family ops as in `tvm_fast_math`, softmax and layer norm
    over the last axis as in `tvm_row_kernels`."""
    import tvm

    from rwdeploy.runtime.tvm_fast_math import fast_math_legalizers, silu_pass
    from rwdeploy.runtime.tvm_identity import identity_broadcast_pass
    from rwdeploy.runtime.tvm_pool import max_pool2d_legalizer
    from rwdeploy.runtime.tvm_reshape_sink import reshape_sink_pass
    from rwdeploy.runtime.tvm_row_kernels import row_legalizers, safe_softmax_pass
    from rwdeploy.runtime.tvm_schedule import channel_unit, vector_lanes, vector_registers

    lanes, registers = vector_lanes(target), vector_registers(target)
    unit = channel_unit(target)
    fast_math = fast_math_legalizers()
    return [
        silu_pass(),
        safe_softmax_pass(lanes),
        identity_broadcast_pass(),
        reshape_sink_pass(),
        tvm.relax.transform.DeadCodeElimination(),
        tvm.relax.transform.LegalizeOps({"relax.nn.conv2d": conv2d_legalizer(lanes, registers, unit),
                                         "relax.matmul": matmul_legalizer(lanes, registers),
                                         "relax.nn.max_pool2d": max_pool2d_legalizer(),
                                         **fast_math, **row_legalizers(lanes, fast_math)}),
        tvm.relax.transform.AnnotateTIROpPattern(),
        tvm.relax.transform.FoldConstant(),
        tvm.relax.transform.FuseOps(),
        tvm.relax.transform.FuseTIR(),
    ]
