"""Reshapes moved below elementwise ops (`runtime/tvm_reshape_sink.py`): the rewritten Relax
functions compute what torch does, and a transformer MLP's GELU and residual add land in the
matmul kernels' epilogues."""
import numpy as np
import pytest
import torch
from torch import nn
import tvm
from tvm import relax

from rwdeploy.runtime import tvm_build
from rwdeploy.runtime.tvm_reshape_sink import reshape_sink_pass
from targets_support import cpu_build_checked


class _Mlp(nn.Module):
    """A ViT block's MLP half: norm, Linear, GELU, Linear, residual add, on (batch, tokens,
    features), which `torch.export` writes as 2-D matmuls between reshapes."""

    def __init__(self, features: int = 24, hidden: int = 48) -> None:
        super().__init__()
        self.norm, self.fc1, self.act, self.fc2 = (nn.LayerNorm(features), nn.Linear(features, hidden),
                                                   nn.GELU(), nn.Linear(hidden, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class _BroadcastGate(nn.Module):
    """A channel gate: the pooled map reshaped to (N, C, 1, 1) and broadcast over the map (a
    reshape that must stay where it is), then a flatten, ReLU6 and a scale on the flat view."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(x.mean(dim=(2, 3)).reshape(x.shape[0], x.shape[1], 1, 1))
        flat = (x * gate).flatten(1)
        return torch.nn.functional.relu6(flat) * 0.5 + flat.sum(dim=1, keepdim=True)


class _SharedReshape(nn.Module):
    """One reshaped tensor read by two elementwise ops and, unreshaped, by a third."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2.0 + 1.0
        r = y.reshape(x.shape[0], -1)
        # operand order matters to subtract and divide; y.sum() is one value, broadcast
        return (x.reshape(x.shape[0], -1) - torch.tanh(r)) / (torch.relu(r) + 1.0) * y.sum()


class _Chain(nn.Module):
    """reshape -> ReLU -> reshape to a third shape -> scale: one reshape, at the end."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.reshape(6, 10)).reshape(3, 20) * 3.0


def _ops(func: relax.Function) -> list[tuple[str, list[str]]]:
    """(op name, names of the ops its tensor arguments are bound to) per call binding."""
    values = {}
    out = []
    for block in func.body.blocks:
        for binding in block.bindings:
            v = binding.value
            if isinstance(v, relax.Var):  # an alias: what it names
                values[binding.var] = values.get(v, v)
                continue
            values[binding.var] = v
            if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op):
                readers = [values[a].op.name if isinstance(values.get(a), relax.Call)
                           and isinstance(values[a].op, tvm.ir.Op) else "" for a in v.args]
                out.append((v.op.name, readers))
    return out


def _run(mod: tvm.IRModule, x: torch.Tensor) -> np.ndarray:
    exe = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(exe, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x.numpy())).numpy()


@pytest.mark.parametrize("make, shape", [(_Mlp, (2, 13, 24)), (_BroadcastGate, (2, 6, 5, 5)),
                                         (_SharedReshape, (3, 4, 5)), (_Chain, (4, 15))])
def test_the_rewritten_function_computes_the_same(make, shape):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(shape)
    mod = tvm_build.import_relax(model, x)
    sunk = reshape_sink_pass()(mod)
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(_run(sunk, x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_run(mod, x), want, rtol=1e-5, atol=1e-5)  # the reference path runs too


def test_the_mlp_gelu_and_residual_read_the_matmuls_directly():
    torch.manual_seed(0)
    mod = tvm_build.import_relax(_Mlp().eval(), torch.randn(1, 13, 24))
    before, after = _ops(mod["main"]), _ops(reshape_sink_pass()(mod)["main"])
    assert ("relax.nn.gelu", ["relax.reshape"]) in before   # what torch.export writes
    gelu = [readers for op, readers in after if op == "relax.nn.gelu"]
    assert gelu == [["relax.add"]]   # the bias add after the first matmul
    # the second matmul reads the GELU itself: the reshapes around it cancelled
    assert ("relax.matmul", ["relax.nn.gelu", "relax.permute_dims"]) in after
    # the residual add reads the second matmul's bias add, the input viewed in 2-D
    assert ("relax.add", ["relax.reshape", "relax.add"]) in after
    assert sum(op == "relax.reshape" for op, _ in after) < sum(op == "relax.reshape" for op, _ in before)


def test_a_broadcast_operand_keeps_its_reshape():
    mod = tvm_build.import_relax(_BroadcastGate(), torch.randn(2, 6, 5, 5))
    after = _ops(reshape_sink_pass()(mod)["main"])
    # the gate is reshaped to (N, C, 1, 1) and broadcast: sigmoid moves above that reshape,
    # the multiply with the full map does not
    assert ("relax.sigmoid", ["relax.mean"]) in after
    assert ("relax.multiply", ["", "relax.reshape"]) in after


def test_a_built_mlp_fuses_gelu_and_residual_into_the_matmul_kernels():
    torch.manual_seed(0)
    art = cpu_build_checked(_Mlp().eval(), torch.randn(1, 13, 24))
    kernels = [k for names in art.kernels.values() if isinstance(names, list) for k in names]
    assert not [k for k in kernels if "gelu" in k and "dense" not in k], kernels
    assert [k for k in kernels if "dense" in k and "gelu" in k]
    assert [k for k in kernels if "dense" in k and k.count("add") == 2], kernels   # bias + residual


def test_a_chain_of_reshapes_becomes_one():
    after = _ops(reshape_sink_pass()(tvm_build.import_relax(_Chain(), torch.randn(4, 15)))["main"])
    assert ("relax.nn.relu", [""]) in after   # on the input itself
    assert [readers for op, readers in after if op == "relax.reshape"] == [["relax.multiply", ""]]
