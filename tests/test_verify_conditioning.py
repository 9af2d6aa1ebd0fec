"""Verification of a model that is ill-conditioned in float32: float32 rounding alone moves
its output by more than the tolerance, so two float32 evaluations of one function differ by
that much. The float64 comparison separates that from a wrong rewrite."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rwdeploy import report
from rwdeploy.compile import stage_verify
from rwdeploy.context import CompileContext, CompileOptions
from rwdeploy.errors import VerificationError
from rwdeploy.passes.verify import NOISE_FACTOR, float32_noise, float64_agreement
from rwdeploy.report import markdown


class Cancelling(nn.Module):
    """w*x + c - c: exactly w*x, but float32 keeps it only to the spacing of floats near c
    (~1e-3 at 1e4, ~2e-3 at 3e4), so two offsets round differently."""

    def __init__(self, scale: float = 1.0, offset: float = 1e4) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((4,), 0.7))
        self.scale, self.offset = scale, offset

    def forward(self, x):
        return (self.w * x * self.scale + self.offset) - self.offset


def _context(tmp_path, original: nn.Module, slim: nn.Module) -> CompileContext:
    probes = [torch.randn(8, 4, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    ctx = CompileContext(None, CompileOptions(out=tmp_path / "out"), tmp_path, probes[0], probes)
    ctx.original, ctx.slim = original.eval(), slim.eval()
    return ctx


def test_float64_separates_rounding_from_a_different_function():
    probes = [torch.randn(8, 4, generator=torch.Generator().manual_seed(0))]
    a, b = Cancelling(offset=1e4), Cancelling(offset=3e4)
    assert float64_agreement(a, b, probes, tolerance=1e-4).max_rel < 1e-10  # the same function (float64 keeps ~1e-12 of it)
    noise = float32_noise(a, probes)
    assert 1e-5 < noise < 1e-2  # float32 keeps ~3 digits of w*x here
    assert float64_agreement(a, Cancelling(scale=1.01), probes, tolerance=1e-4).max_rel == pytest.approx(0.01, rel=1e-6)


def test_verify_accepts_float32_rounding_and_says_so(tmp_path):
    ctx = _context(tmp_path, Cancelling(offset=1e4), Cancelling(offset=3e4))
    stage_verify(ctx)
    ver = ctx.sections["verification"]
    assert ver["passed"] and ver["max_rel"] > ctx.options.tolerance  # float32 alone differs by more
    f64 = ver["float64"]
    assert f64["max_rel"] < 1e-10 and ver["max_rel"] <= NOISE_FACTOR * max(f64["float32_noise_of_original"],
                                                                           f64["float32_noise_of_slim"])
    summary = markdown(report.summary(report.make_report({"verification": ver})))
    assert "Ill-conditioned in float32 at the probes" in summary and "in float64 they agree" in summary


def test_verify_rejects_a_different_function_under_the_same_rounding(tmp_path):
    ctx = _context(tmp_path, Cancelling(offset=1e4), Cancelling(scale=1.001, offset=3e4))
    with pytest.raises(VerificationError, match="slim model differs from the original"):
        stage_verify(ctx)


def test_runtime_checks_accept_the_float32_noise_floor_only(tmp_path):
    """ctx.check (ONNX Runtime vs torch, packed vs slim) passes within the original's float32
    noise floor (times NOISE_FACTOR), and no further."""
    ctx = _context(tmp_path, Cancelling(offset=1e4), Cancelling(offset=3e4))
    check = ctx.check(ctx.original, Cancelling(offset=3e4).eval(), "rounded", hint="-")
    assert check.passed and check.tolerance > ctx.options.tolerance
    with pytest.raises(VerificationError, match="off by a percent"):
        ctx.check(ctx.original, Cancelling(scale=1.01).eval(), "off by a percent", hint="-")
