"""Symmetric fixed-point weight quantization with power-of-two scales.

A b-bit weight is an integer q in [-(2^(b-1)), 2^(b-1) - 1] times a scale s = 2^k. Power-of-two
scales make dequantization a shift on integer hardware and make the float value q * s exact
in float32, so a quantized checkpoint stores the same numbers the deployed model computes.

The scale is the smallest power of two with max|w| <= qmax * s, so nothing is clipped and
|w - s * round(w / s)| <= s / 2 for every weight. The rule is idempotent: recomputing the scale
from already-quantized weights returns the same scale (the largest |q| is above qmax / 2),
which lets an exporter recover integers from dequantized weights and check them.
"""
from __future__ import annotations

import torch

from rwdeploy.errors import OptionError

SUPPORTED_BITS = (4, 8)


def check_bits(bits: int) -> int:
    if int(bits) not in SUPPORTED_BITS:
        raise OptionError(f"--quantize {bits}: unsupported bit width", hint="use 8 or 4")
    return int(bits)


def qrange(bits: int) -> tuple[int, int]:
    """The signed integer range of `bits` bits: (-2^(b-1), 2^(b-1) - 1)."""
    bits = check_bits(bits)
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _amax(w: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return w.detach().abs().amax()
    dims = [d for d in range(w.dim()) if d != axis]
    return w.detach().abs().amax(dim=dims) if dims else w.detach().abs()


def power_of_two_scale(w: torch.Tensor, bits: int, axis: int | None = None) -> torch.Tensor:
    """Scale(s) 2^ceil(log2(max|w| / qmax)); one per slice along `axis`, or one for the tensor.

    An all-zero tensor (or slice, e.g. a pruned filter) gets scale 1: its integers are all 0.
    """
    _, qmax = qrange(bits)
    amax = _amax(w, axis).to(torch.float64)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    exponent = torch.ceil(torch.log2(safe / qmax))
    # log2 of an exact power of two can round up by one ulp; step down when the smaller scale fits.
    smaller = torch.pow(2.0, exponent - 1)
    exponent = torch.where(safe <= qmax * smaller, exponent - 1, exponent)
    scale = torch.pow(2.0, exponent)
    scale = torch.where(amax > 0, scale, torch.ones_like(scale))
    return scale.to(torch.float32)


def _broadcast(scale: torch.Tensor, w: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or scale.dim() == 0:
        return scale
    shape = [1] * w.dim()
    shape[axis] = -1
    return scale.reshape(shape)


def quantize(w: torch.Tensor, scale: torch.Tensor, bits: int, axis: int | None = None) -> torch.Tensor:
    """Integers round(w / s) clamped to the b-bit range, as int8 (4-bit values lie in [-8, 7])."""
    qmin, qmax = qrange(bits)
    q = torch.round(w.detach() / _broadcast(scale, w, axis)).clamp_(qmin, qmax)
    return q.to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    return q.to(torch.float32) * _broadcast(scale, q, axis)


class _RoundSTE(torch.autograd.Function):
    """round() forward, identity backward: the straight-through estimator."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def fake_quantize(w: torch.Tensor, bits: int, axis: int | None = None) -> torch.Tensor:
    """Quantize-dequantize `w` in float, differentiable by the straight-through estimator.

    The scale is recomputed from the current weights without gradient; since nothing is clipped
    (max|w| <= qmax * s), the STE gradient is the identity for every weight.
    """
    qmin, qmax = qrange(bits)
    s = _broadcast(power_of_two_scale(w, bits, axis), w, axis).to(w.dtype)
    return torch.clamp(_RoundSTE.apply(w / s), qmin, qmax) * s
