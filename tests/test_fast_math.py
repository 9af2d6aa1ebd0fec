"""exp-family ops in cpu builds: vectorisable arithmetic (no libm call per element), SiLU one
stage in the conv's epilogue, all against float64 numpy / torch."""
import math
import re

import numpy as np
import pytest
import torch
import tvm
from scipy.special import erf
from torch import nn
from tvm import relax

from rwdeploy.runtime import tvm_build
from rwdeploy.runtime.tvm_build import cpu_pipeline
from rwdeploy.runtime.tvm_sparse import host_target

SHAPE = (2, 24, 9, 10)


def _reference(kind: str, x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    sig = 1 / (1 + np.exp(-x))
    e = np.exp(x - x.max(1, keepdims=True))
    return {"exp": np.exp(x), "sigmoid": sig, "silu": x * sig, "silu_decomposed": x * sig, "tanh": np.tanh(x),
            "gelu": 0.5 * x * (1 + erf(x / math.sqrt(2))), "softmax": e / e.sum(1, keepdims=True)}[kind]


def _module(kind: str) -> tvm.IRModule:
    bb, op = relax.BlockBuilder(), relax.op
    x = relax.Var("x", relax.TensorType(SHAPE, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = {"exp": lambda: op.exp(x), "sigmoid": lambda: op.sigmoid(x), "silu": lambda: op.nn.silu(x),
                 "silu_decomposed": lambda: op.multiply(op.sigmoid(x), x), "tanh": lambda: op.tanh(x),
                 "gelu": lambda: op.nn.gelu(x), "softmax": lambda: op.nn.softmax(x, axis=1)}[kind]()
            out = bb.emit_output(bb.emit(y))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("kind", ["exp", "sigmoid", "silu", "silu_decomposed", "tanh", "gelu", "softmax"])
def test_ops_match_float64_and_call_no_libm(kind):
    target = host_target()
    executable = tvm.compile(_module(kind), target=target, relax_pipeline=cpu_pipeline(target, {}))
    ir = executable.mod.imports[0].inspect_source("ll")
    assert not any(f"@{fn}" in ir for fn in ("expf", "tanhf", "erff", "llvm.exp.", "llvm.tanh.")), kind
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(SHAPE) * 6).astype(np.float32)
    x.flat[:4] = [-100.0, 100.0, 0.0, -87.5]          # beyond the clamp, and 0
    if kind == "exp":
        x = np.clip(x, -80, 80)                        # float32's range
    y = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy().astype(np.float64)
    ref = _reference(kind, x)
    assert np.isfinite(y).all()
    # relative to the largest output: float32 rounding is ~6e-8 of it
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-6 * np.abs(ref).max())
    if kind in ("exp", "sigmoid", "softmax"):          # positive outputs: close elementwise too
        small = ref > 1e-30
        assert (np.abs(y - ref)[small] / ref[small]).max() < 1e-5


class ConvSilu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)

    def forward(self, x):
        y = self.conv(x)
        y = y * torch.sigmoid(y)                      # SiLU as export writes it
        return nn.functional.silu(self.dw(y))


def test_silu_is_one_stage_in_the_conv_epilogue():
    """multiply(x, sigmoid(x)) becomes nn.silu, fused with the conv before it into one kernel
    that writes the conv's output once; the build matches torch."""
    torch.manual_seed(0)
    model = ConvSilu().eval()
    x = torch.randn(1, 8, 20, 20)
    art = tvm_build.build(model, x, "cpu", threads=1)
    ir = art.executable.mod.imports[0].inspect_source("ll")
    assert "sigmoid" not in ir
    assert re.search(r"define [^\n]*@fused_conv2d\w*_silu", ir) and re.search(r"define [^\n]*@fused_depthwise_conv2d\w*_silu", ir)
    y = relax.VirtualMachine(art.executable, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy())).numpy()
    ref = model(x).detach().numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


class ConvHardswish(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)

    def forward(self, x):
        return nn.functional.hardswish(self.conv(x))


def test_hardswish_diamond_is_inlined_into_the_conv_tile(monkeypatch):
    """x * clip(x + 3, 0, 6) / 6 reads the conv output twice: the branch is inlined into the
    multiply and the whole epilogue into the conv's write-back (no separate stage remains)."""
    from rwdeploy.runtime import tvm_schedule

    scheduled = []
    real = tvm_schedule.schedule_reduction

    def spy(func, *args, **kwargs):
        out = real(func, *args, **kwargs)
        if out is not None:
            scheduled.append(out.script())
        return out

    monkeypatch.setattr(tvm_schedule, "schedule_reduction", spy)
    torch.manual_seed(0)
    model = ConvHardswish().eval()
    x = torch.randn(1, 3, 32, 32)
    art = tvm_build.build(model, x, "cpu", threads=1)
    conv = [s for s in scheduled if "rw_conv2d_nhwc_packed" in s]
    assert len(conv) == 1
    blocks = set(re.findall(r'T\.sblock\("(\w+)"\)', conv[0]))
    assert not any(b.startswith(("T_multiply", "T_divide", "T_add", "compute")) for b in blocks), blocks
    y = relax.VirtualMachine(art.executable, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy())).numpy()
    ref = model(x).detach().numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
