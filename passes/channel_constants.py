"""A compact, exact form of the position-dependent constant removed channels add to a conv.

A removed channel c that reaches a convolution carries a value that does not depend on the
input: x_c = v_c * P, where the spatial pattern P is all ones unless pooling or a padded
depthwise conv shaped it. Convolution is linear, so what the removed channels add to output
channel o is conv(P, K)[o] with K[o] = sum_c v_c * W[o, c] over the removed channels of o's
conv group. Storing K (C_out x r x taps, r = number of distinct patterns, almost always 1)
instead of the C_out x H x W map it produces keeps the slim model small; the map is recomputed
by one tiny conv whose inputs are all constants (ONNX Runtime folds it at session creation).
The form is only used when it reproduces the dense map (float64) to round-off.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
MAX_PATTERNS = 4  # more distinct spatial patterns than this: keep the dense map
_MATCH_TOL = 1e-10  # relative round-off allowed when matching patterns / checking the result


@dataclass(frozen=True)
class ConvGeometry:
    """What a conv does besides its weight (bias excluded): enough to replay it
    (`ops.conv.ConvView.geometry()`)."""
    weight: torch.Tensor  # [O, C/groups, k...]
    groups: int
    stride: Any
    padding: Any
    dilation: Any


@dataclass(frozen=True)
class BorderKernel:
    kernel: torch.Tensor  # [O_kept, r, k...] float64
    patterns: torch.Tensor | None  # [1, r, *spatial] float64; None: a single all-ones pattern
    spatial: tuple[int, ...]  # input spatial shape the map is computed at
    geometry: ConvGeometry

    def source(self) -> torch.Tensor:
        if self.patterns is not None:
            return self.patterns
        return self.kernel.new_ones((1, 1, *self.spatial))

    def evaluate(self) -> torch.Tensor:
        g = self.geometry
        return CONV_FUNCTIONS[len(self.spatial)](self.source(), self.kernel, None, g.stride, g.padding,
                                                 g.dilation)


def spatial_patterns(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Factor channels x positions values X ([C, S]) as V @ P with few patterns P ([r, S]).

    Each pattern is scaled to 1 at its largest entry. Returns (V [C, r], P [r, S]) or None
    when more than MAX_PATTERNS distinct patterns are needed.
    """
    tol = _MATCH_TOL * float(x.abs().max()) if x.numel() else 0.0
    patterns: list[torch.Tensor] = []
    coeffs = torch.zeros(x.shape[0], MAX_PATTERNS, dtype=x.dtype)
    for c in range(x.shape[0]):
        row = x[c]
        if float(row.abs().max()) <= tol:
            continue
        for j, p in enumerate(patterns):
            a = float(row @ p) / float(p @ p)
            if float((row - a * p).abs().max()) <= tol:
                coeffs[c, j] = a
                break
        else:
            if len(patterns) == MAX_PATTERNS:
                return None
            peak = row[row.abs().argmax()]
            p = row / peak
            if float((p - 1).abs().max()) <= _MATCH_TOL:
                p = torch.ones_like(p)  # a constant channel: exactly the ones image
            patterns.append(p)
            coeffs[c, len(patterns) - 1] = peak
    if not patterns:
        return None
    return coeffs[:, :len(patterns)], torch.stack(patterns)


def border_kernel(geometry: ConvGeometry, x_gone: torch.Tensor, keep_out: torch.Tensor,
                  dense: torch.Tensor) -> BorderKernel | None:
    """The compact form of `dense` (= the kept outputs of the conv applied to `x_gone`, the
    removed channels' values [1, C, *spatial] in float64), or None when none reproduces it."""
    spatial = tuple(x_gone.shape[2:])
    if len(spatial) not in CONV_FUNCTIONS:
        return None
    factors = spatial_patterns(x_gone[0].reshape(x_gone.shape[1], -1))
    if factors is None:
        return None
    coeffs, patterns = factors
    w, g = geometry.weight, geometry.groups
    out_ch, per_in = w.shape[0], w.shape[1]
    # coefficient of each (output channel, its group's input channel, pattern)
    per_out = out_ch // g
    group_coeffs = coeffs.view(g, per_in, -1)[torch.arange(out_ch) // per_out]
    kernel = torch.einsum("oit,oir->ort", w.flatten(2), group_coeffs).reshape(out_ch, -1, *w.shape[2:])
    kernel = kernel[keep_out.nonzero().flatten()].contiguous()
    ones_only = patterns.shape[0] == 1 and bool((patterns == 1).all())
    stored = None if ones_only else patterns.reshape(1, -1, *spatial).contiguous()
    bk = BorderKernel(kernel, stored, spatial, geometry)
    with torch.no_grad():
        got = bk.evaluate()
    scale = float(dense.abs().max())
    if got.shape != dense.shape or float((got - dense).abs().max()) > _MATCH_TOL * max(scale, 1e-30):
        return None
    if stored_elements(bk) >= dense.numel():
        return None
    return bk


def stored_elements(bk: BorderKernel) -> int:
    """Stored elements of the compact form."""
    return bk.kernel.numel() + (0 if bk.patterns is None else bk.patterns.numel())
