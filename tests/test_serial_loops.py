"""A build for one core runs its kernels' parallel loops in place (no thread-pool launch per
call); a build for more cores keeps them parallel; both match torch."""
import numpy as np
import torch
import tvm
from torch import nn
from tvm.script import tirx as T

from rwdeploy.runtime import tvm_build
from rwdeploy.runtime.tvm_serial_loops import (SERIAL_MAX_ITERATIONS, loop_iterations, runs_on_one_core,
                                                serial_loops_pass)


def _scaled(cores: int | None):
    @T.prim_func
    def scale(a: T.Buffer((8, 16), "float32"), b: T.Buffer((8, 16), "float32")):
        for i in T.parallel(8):
            for j in T.serial(16):
                b[i, j] = a[i, j] * T.float32(2)

    if cores is None:
        return scale
    return scale.with_attr("target", tvm.target.Target({"kind": "llvm", "num-cores": cores}))


def _loop_kinds(func) -> list:
    kinds = []

    def walk(stmt):
        if isinstance(stmt, tvm.tirx.For):
            kinds.append(stmt.kind)
            walk(stmt.body)
        elif isinstance(stmt, tvm.tirx.SeqStmt):
            for child in stmt.seq:
                walk(child)
        elif hasattr(stmt, "body"):
            walk(stmt.body)

    walk(func.body)
    return kinds


def _passed(cores: int | None):
    mod = serial_loops_pass()(tvm.IRModule({"scale": _scaled(cores)}))
    return mod["scale"]


def test_one_core_loops_become_serial():
    assert runs_on_one_core(_scaled(1))
    assert _loop_kinds(_passed(1)) == [tvm.tirx.ForKind.SERIAL, tvm.tirx.ForKind.SERIAL]


def test_more_cores_or_no_target_keep_the_parallel_loop():
    assert not runs_on_one_core(_scaled(2)) and not runs_on_one_core(_scaled(None))
    for cores in (2, None):
        assert _loop_kinds(_passed(cores))[0] == tvm.tirx.ForKind.PARALLEL


def test_a_large_loop_nest_keeps_its_parallel_loop_on_one_core():
    rows = SERIAL_MAX_ITERATIONS // 1024 + 1

    @T.prim_func
    def big(a: T.Buffer((rows, 1024), "float32"), b: T.Buffer((rows, 1024), "float32")):
        for i in T.parallel(rows):
            for j in T.serial(1024):
                b[i, j] = a[i, j] + T.float32(1)

    func = big.with_attr("target", tvm.target.Target({"kind": "llvm", "num-cores": 1}))
    assert loop_iterations(func.body) == rows * 1024 > SERIAL_MAX_ITERATIONS
    assert loop_iterations(_scaled(1).body) == 8 * 16
    out = serial_loops_pass()(tvm.IRModule({"big": func}))["big"]
    assert _loop_kinds(out)[0] == tvm.tirx.ForKind.PARALLEL


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = torch.relu(self.b(y) + y)
        return self.fc(y.mean((2, 3)))


def _host_ir(art) -> str:
    return art.executable.mod.imports[0].inspect_source("ll")


def test_one_thread_build_launches_nothing_and_matches_torch():
    torch.manual_seed(0)
    model = SmallNet().eval()
    x = torch.randn(2, 3, 12, 12)
    want = model(x).detach().numpy()
    one = tvm_build.build(model, x, "cpu", threads=1)
    two = tvm_build.build(model, x, "cpu", threads=2)
    # the thread-pool entry point is called by the 2-core build's kernels only
    assert "TVMBackendParallelLaunch" in _host_ir(two)
    assert "TVMBackendParallelLaunch" not in _host_ir(one)
    scale = float(np.abs(want).max())
    for art in (one, two):
        got = tvm_build.run_local(art, x)
        assert np.abs(got - want).max() <= 1e-4 * scale
