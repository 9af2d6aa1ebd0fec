"""Removed channels' constants carried by a kept constant channel, instead of a constant map.

Where a removed channel reaches a convolution through zero padding, what it adds is a map
that differs at the border (`channel_constants`): the removal pass adds it after the conv,
one more node between the conv and its batch norm / activation / residual add. ONNX Runtime
then cannot fuse them, and its NCHWc convs convert back to NCHW around every such add.

Alignment keeps some removable channels (`channel_alignment`). A kept channel whose producers
are zero holds a constant too, x_k = a_k * P, and zero padding treats it exactly like the
removed ones. When every removed channel a conv reads is a multiple of the same pattern,
x_c = a_c * P, their part of the conv is the kept channel's part with the weight column
sum_c (a_c / a_k) * W[:, c]: folded into W[:, k], the conv computes the same function with no
map at all. Interleaved in ONNX Runtime, 1
thread, batch 1, slim 70 % with `--align 16`: ResNet-18 0.89x the time, ResNet-20 0.90x,
ResNet-56 0.84x, VGG-16-BN 0.90x.

Only kept channels serve: choosing to keep one for this (a dedicated carrier, one more channel
per group) measured no faster than the map on slim ResNet-20 at `--align off`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rwdeploy.passes.ops import LayerView
from rwdeploy.passes.ops.conv import ConvView
from rwdeploy.passes.ops.layer import replace_tensor

_MATCH_TOL = 1e-10  # relative round-off allowed when matching a removed channel to the carrier
# a kept channel this much smaller than the removed ones would carry them with huge ratios
_MIN_CARRIER = 1e-6


@dataclass(frozen=True)
class CarrierFold:
    """Removed input channels folded into kept input channel `carrier`'s weight column."""

    carrier: int  # input channel index (before the cut)
    ratios: dict[int, float]  # removed input channel index -> a_c / a_k
    max_abs: float  # the largest value of the map this replaces


def carrier_fold(view: LayerView, x: torch.Tensor, classes: torch.Tensor, removed: set[int],
                 constant: set[int], max_abs: float) -> CarrierFold | None:
    """How the removed input channels of a conv (`x`: its input, batch item 0, float64;
    `classes`: the class of each input channel) fold into a kept constant channel (a class in
    `constant`), or None where no kept channel carries their pattern."""
    if (not isinstance(view, ConvView) or view.transposed or view.groups != 1 or not view.exclusive
            or x.shape[1] != classes.numel()):
        return None  # the weight column must be this conv's alone, and mix every input channel
    rows = x[0].reshape(x.shape[1], -1)
    peak = rows.abs().amax(dim=1)
    gone = [c for c in range(rows.shape[0]) if int(classes[c]) in removed and float(peak[c]) > 0]
    if not gone:
        return None
    scale = max(float(peak[c]) for c in gone)
    for k in sorted(range(rows.shape[0]), key=lambda c: -float(peak[c])):  # the largest: smallest ratios
        cls = int(classes[k])
        if cls in removed or cls not in constant or float(peak[k]) <= _MIN_CARRIER * scale:
            continue
        p, tol = rows[k], _MATCH_TOL * max(scale, float(peak[k]))
        ratios = {c: float(rows[c] @ p) / float(p @ p) for c in gone}
        if all(float((rows[c] - a * p).abs().max()) <= tol for c, a in ratios.items()):
            return CarrierFold(k, ratios, max_abs)
    return None


def fold_into_carrier(view: LayerView, fold: CarrierFold) -> None:
    """Add the removed channels' weight columns, scaled, to the carrier's (before the cut)."""
    w = view.weight.detach()
    acc = w.double().clone()
    for c, a in fold.ratios.items():
        acc[:, fold.carrier] += a * acc[:, c]
    replace_tensor(view.gm, view.tensors["weight"], acc.to(w.dtype))
