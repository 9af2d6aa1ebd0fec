"""A conv that reads an NCHW tensor of few channels (the model's image) in place of a transpose.

ConvertLayout makes every conv NHWC and puts a `permute_dims` (NCHW -> NHWC) before the first,
on the model's input: for a 3-channel image a separate pass that writes each pixel's three
values next to each other, one scalar at a time (3 x 224 x 224: 30-75 us on the Xeon, as much
as MobileNetV2's 3x3 stem conv itself once it reads its padding in place). Such a conv only
ever broadcasts its input one scalar at a time, so it can read the NCHW tensor where it is:
`fold_input_transpose_pass` rewrites conv2d(permute_dims(x), data_layout NHWC) into
conv2d(x, data_layout NCHW, out_layout NHWC) where x has fewer channels than a 512-bit vector;
`tvm_legalize` computes it through an NHWC view of x (`NCHW_VIEW`, `nhwc_view`) that the
schedule inlines into the padded copy or, where the padding is read in place, into the conv.
Wider inputs keep the transpose: a conv whose channels fill vectors reads them as vectors.
With the padding read in place too, slim MobileNetV2 70 % takes 0.86-0.87x the time of the build
that transposes and copies its image (0.89-0.90x with the padding alone), dense 0.97-0.99x
(`benchmarks/stem_input.py`, interleaved, batch 1 and 8, on the Xeon).
"""
from __future__ import annotations

from typing import Any

from rwdeploy.runtime.tvm_schedule import NCHW_VIEW

NCHW_TO_NHWC = [0, 2, 3, 1]


def nhwc_view(data: Any) -> Any:
    """An NHWC view of an NCHW tensor: a stage the schedule inlines into its reader."""
    from tvm import te

    n, c, h, w = data.shape
    return te.compute((n, h, w, c), lambda i, y, x, ch: data[i, ch, y, x], name=NCHW_VIEW)


def folds_transpose(channels: int, lanes: int) -> bool:
    """Whether a conv reads an NCHW input of `channels` channels in place (see the module):
    with 256-bit vectors too (Zen 3, with the padding read in place, `tvm_schedule.inlines_padding`:
    slim MobileNetV2 70 % 0.95x / 0.97x the time at batch 1 / 8, dense MobileNetV2 and ResNet-18
    at batch 1 1.00x)."""
    return lanes >= 8 and channels < lanes


def fold_input_transpose_pass(lanes: int) -> Any:
    """The Relax pass: conv2d(permute_dims(x, [0, 2, 3, 1]), NHWC, HWIO, groups 1) with x of
    `folds_transpose` channels -> conv2d(x, NCHW, HWIO, out NHWC); an unused transpose is
    dropped."""
    import tvm
    from tvm import relax

    from rwdeploy.runtime.tvm_fold import rewrite_functions, static_shape

    @relax.expr_functor.mutator
    class FoldInputTranspose(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) != "relax.nn.conv2d":
                return call
            attrs = call.attrs
            if (attrs.data_layout != "NHWC" or attrs.kernel_layout != "HWIO" or attrs.out_layout != "NHWC"
                    or int(attrs.groups) != 1 or not isinstance(call.args[0], relax.Var)):
                return call
            source = self.lookup_binding(call.args[0])
            if (not isinstance(source, relax.Call) or getattr(source.op, "name", None) != "relax.permute_dims"
                    or source.attrs.axes is None or [int(a) for a in source.attrs.axes] != NCHW_TO_NHWC):
                return call
            shape = static_shape(source.args[0])
            if shape is None or len(shape) != 4 or not folds_transpose(shape[1], lanes):
                return call
            return relax.op.nn.conv2d(source.args[0], call.args[1], strides=attrs.strides,
                                      padding=attrs.padding, dilation=attrs.dilation, groups=1,
                                      data_layout="NCHW", kernel_layout="HWIO", out_layout="NHWC",
                                      out_dtype=attrs.out_dtype)

    @tvm.transform.module_pass(opt_level=0, name="rwdeploy.FoldInputTranspose")
    def fold(mod: Any, _ctx: Any) -> Any:
        return rewrite_functions(FoldInputTranspose(mod), mod)

    return fold
