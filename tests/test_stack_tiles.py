"""Register tiles of 1 KB or more keep their accumulators on the stack (in registers), not in a
TVM workspace allocated, zeroed and freed per tile; the build matches torch."""
import re

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

from rwdeploy.runtime import tvm_build
from rwdeploy.runtime.tvm_stack_tiles import STACK_WORKSPACE_BYTES, register_tir_pipeline


class Residual(nn.Module):
    """A 1x1 conv with a residual add, as ResNet-50 ends a bottleneck (its tile: 2 vectors x 14
    pixels, 1792 bytes of accumulators on a 512-bit core)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(64, 256, 1)

    def forward(self, x, r):
        return torch.relu(self.conv(x) + r)


def _kernel_ir(executable) -> str:
    return executable.mod.imports[0].inspect_source("ll")


def test_conv_tiles_allocate_nothing_per_tile_and_match_torch():
    torch.manual_seed(0)
    model = Residual().eval()
    x, r = torch.randn(1, 64, 28, 28), torch.randn(1, 256, 28, 28)
    art = tvm_build.build(model, (x, r), "cpu", threads=1)
    ir = _kernel_ir(art.executable)
    assert "fused_conv2d" in ir
    assert "TVMBackendAllocWorkspace" not in ir
    assert not re.search(r"llvm\.memset[^\n]* i64 1792,", ir)      # the tile was zeroed in memory
    y = relax.VirtualMachine(art.executable, tvm.cpu())["main"](
        tvm.runtime.tensor(x.numpy()), tvm.runtime.tensor(r.numpy())).numpy()
    with torch.no_grad():
        ref = model(x, r).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _workspace_kernel(floats: int):
    """A PrimFunc with a parallel loop whose body allocates a `floats`-element scratch buffer."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def f(x: T.Buffer((4, floats), "float32"), y: T.Buffer((4,), "float32")):
        T.func_attr({"tir.noalias": True})
        with T.sblock("root"):
            for i in T.parallel(4):
                acc = T.decl_buffer((floats,), "float32", scope="global")
                for j in range(floats):
                    acc[j] = x[i, j] * T.float32(2)
                y[i] = T.float32(0)
                for j in range(floats):
                    y[i] = y[i] + acc[j]
    return f


@pytest.mark.parametrize("floats", [512, STACK_WORKSPACE_BYTES // 4 + 1])
def test_only_small_constant_workspaces_move_to_the_stack(floats):
    mod = tvm.IRModule({"main": _workspace_kernel(floats)})
    executable = tvm.compile(mod, target="llvm", tir_pipeline="default")
    assert "TVMBackendAllocWorkspace" in executable.mod.inspect_source("ll")  # TVM: a workspace
    lowered = tvm.compile(mod, target="llvm", tir_pipeline=register_tir_pipeline())
    small = floats * 4 <= STACK_WORKSPACE_BYTES
    assert ("TVMBackendAllocWorkspace" in lowered.mod.inspect_source("ll")) != small
    x = np.random.default_rng(0).standard_normal((4, floats)).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros(4, np.float32))
    lowered["main"](tvm.runtime.tensor(x), y)
    np.testing.assert_allclose(y.numpy(), 2 * x.astype(np.float64).sum(1), rtol=1e-4)


def _lowered_kernel(freed: bool, nbytes: int = 64):
    """A kernel as `LowerTVMBuiltin` leaves it: a workspace per parallel task, its null check,
    and (with `freed`) its free in the same sequence."""
    from tvm.script import tirx as T

    @T.prim_func
    def f(x: T.Buffer((64,), "float32")):
        for i in T.parallel(4):
            acc = T.decl_buffer((16,), "float32", data=T.TVMBackendAllocWorkspace(1, 0, T.uint64(nbytes), 2, 32))
            if T.isnullptr(acc.data):
                T.tvm_throw_last_error()
            for j in range(16):
                acc[j] = x[i * 16 + j]
            for j in range(16):
                x[i * 16 + j] = acc[j] * T.float32(2)
            if freed:
                if T.TVMBackendFreeWorkspace(1, 0, acc.data) != 0:
                    T.tvm_throw_last_error()
    return f


def test_an_allocation_moves_only_with_its_free():
    from rwdeploy.runtime.tvm_stack_tiles import _rewrite

    moved = _rewrite(_lowered_kernel(True).body, STACK_WORKSPACE_BYTES).script()
    assert "alloc_buffer" in moved
    assert not any(s in moved for s in ("TVMBackendAllocWorkspace", "TVMBackendFreeWorkspace", "isnullptr"))
    # no free in the same sequence (or too large): a stack pointer must never reach the pool's free
    for kernel in (_lowered_kernel(False), _lowered_kernel(True, STACK_WORKSPACE_BYTES + 4)):
        assert _rewrite(kernel.body, STACK_WORKSPACE_BYTES).same_as(kernel.body)
