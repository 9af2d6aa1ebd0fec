"""`runtime.tvm_fold`: weight arithmetic folded in numpy gives what TVM's FoldConstant gives
(which builds and runs every call), bit for bit, and leaves what it does not know to it."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from rwdeploy.runtime.tvm_fold import fold_weight_arithmetic_pass  # noqa: E402


def _module(build) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3, 4, 5), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(build(bb, x)))
        bb.emit_func_output(out)
    return bb.get()


def _constants(mod: tvm.IRModule) -> list[np.ndarray]:
    """The tensor constants bound or used in main's blocks."""
    found: list[np.ndarray] = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            exprs = [value, *getattr(value, "args", [])]
            found.extend(e.value.numpy() for e in exprs if isinstance(e, tvm.ir.expr.GenericConst))
    return found


def _ops(mod: tvm.IRModule) -> list[str]:
    names: list[str] = []

    @relax.expr_functor.visitor
    class Collect(relax.PyExprVisitor):
        def visit_call_(self, call):
            super().visit_call_(call)
            names.append(call.op.name)

    Collect().visit_expr(mod["main"])
    return names


rng = np.random.default_rng(0)
W = rng.standard_normal((6, 3, 2, 2)).astype(np.float32)
VAR = rng.random(6).astype(np.float32)


def _bn_scaled_weight(bb, x):
    """What FoldBatchnormToConv2D + DecomposeOpsForInference leave: w * (g / sqrt(var + eps))."""
    eps = tvm.tirx.FloatImm("float32", 1e-5)
    scale = relax.op.divide(relax.const(VAR + 1), relax.op.sqrt(relax.op.add(relax.const(VAR), eps)))
    w = relax.op.multiply(relax.const(W), relax.op.reshape(scale, (6, 1, 1, 1)))
    w = relax.op.permute_dims(relax.op.subtract(w, relax.op.negative(relax.const(W))), [2, 3, 1, 0])
    return relax.op.multiply(relax.op.sum(x), relax.op.astype(relax.op.squeeze(
        relax.op.expand_dims(w, [0, 5]), [0]), "float32"))


def test_numpy_folding_matches_fold_constant_bit_for_bit():
    mod = _module(_bn_scaled_weight)
    ours = fold_weight_arithmetic_pass()(mod)
    theirs = relax.transform.FoldConstant()(mod)
    assert _ops(ours) == _ops(theirs) == ["relax.sum", "relax.multiply"]
    (a,), (b,) = [c for c in _constants(ours) if c.ndim], [c for c in _constants(theirs) if c.ndim]
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == (2, 2, 3, 6, 1)
    assert np.array_equal(a, b)
    scale = (VAR + 1) / np.sqrt(VAR + np.float32(1e-5))
    np.testing.assert_allclose(a[..., 0], np.transpose(W * scale[:, None, None, None] + W, (2, 3, 1, 0)),
                               rtol=1e-6)


def test_unknown_ops_and_integer_arithmetic_are_left_to_fold_constant():
    ints = relax.const(np.arange(6, dtype=np.int32))

    def build(bb, x):
        y = relax.op.divide(ints, relax.const(np.full(6, 4, np.int32)))   # integer division
        z = relax.op.exp(relax.const(VAR))                                 # not an op it knows
        return relax.op.add(relax.op.sum(x), relax.op.add(relax.op.sum(relax.op.astype(y, "float32")),
                                                          relax.op.sum(z)))

    ours = fold_weight_arithmetic_pass()(_module(build))
    assert "relax.divide" in _ops(ours) and "relax.exp" in _ops(ours)
    folded = relax.transform.FoldConstant()(ours)
    assert "relax.exp" not in _ops(folded)
