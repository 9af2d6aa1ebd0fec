"""Data-movement stages read where they are used (`runtime/tvm_injective.py`): hand-made `te`
kernels against numpy, and a built attention block against torch."""
import numpy as np
import torch
from torch import nn
import tvm
from tvm import s_tir, te, topi

from rwdeploy.runtime.tvm_injective import schedule_injective
from targets_support import cpu_build_checked


def _blocks(func) -> list[str]:
    sch = s_tir.Schedule(func)
    return [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]


def _run(func, *arrays: np.ndarray, out_shape) -> np.ndarray:
    lib = tvm.compile(func, target="llvm")
    args = [tvm.runtime.tensor(a) for a in arrays] + [tvm.runtime.tensor(np.zeros(out_shape, "float32"))]
    lib(*args)
    return args[-1].numpy()


def test_a_reshape_then_transpose_becomes_one_stage_with_the_same_values():
    x = te.placeholder((5, 12), name="x")
    r = topi.reshape(x, (5, 3, 4))
    t = topi.transpose(r, (1, 0, 2))
    s = topi.strided_slice(t, [1, 0, 0], [3, 5, 4])
    func = te.create_prim_func([x, s])
    assert len(_blocks(func)) == 3
    done = schedule_injective(func)
    assert done is not None and len(_blocks(done)) == 1
    a = np.random.default_rng(0).standard_normal((5, 12)).astype("float32")
    want = a.reshape(5, 3, 4).transpose(1, 0, 2)[1:3]
    np.testing.assert_array_equal(_run(done, a, out_shape=(2, 5, 4)), want)
    np.testing.assert_array_equal(_run(func, a, out_shape=(2, 5, 4)), want)


def test_a_stage_that_computes_is_not_recomputed_per_reader():
    # exp of a 4-vector broadcast over 64 x 4: inlined, exp would run 64 times per element
    v = te.placeholder((4,), name="v")
    e = te.compute((4,), lambda i: te.exp(v[i]), name="e")
    b = te.compute((64, 4), lambda i, j: e[j] * 2.0, name="b")
    func = te.create_prim_func([v, b])
    assert schedule_injective(func) is None
    # after a copy it is: the copy goes, the exp stays its own stage
    c = te.compute((4,), lambda i: v[(i + 1) % 4], name="c")
    e2 = te.compute((4,), lambda i: te.exp(c[i]), name="e2")
    b2 = te.compute((64, 4), lambda i, j: e2[j] * 2.0, name="b2")
    done = schedule_injective(te.create_prim_func([v, b2]))
    assert done is not None and _blocks(done) == ["e2", "b2"]
    a = np.arange(4, dtype="float32") / 4
    np.testing.assert_allclose(_run(done, a, out_shape=(64, 4)),
                               np.broadcast_to(np.exp(np.roll(a, -1)) * 2.0, (64, 4)), rtol=1e-6)


def test_a_function_with_a_reduction_is_left_alone():
    x = te.placeholder((8, 16), name="x")
    t = topi.transpose(x, (1, 0))
    k = te.reduce_axis((0, 8), name="k")
    total = te.compute((16,), lambda i: te.sum(t[i, k], axis=k), name="total")
    assert schedule_injective(te.create_prim_func([x, total])) is None


class _Attention(nn.Module):
    """A ViT attention: qkv split by reshape / permute / unbind, heads merged back by transpose."""

    def __init__(self, dim: int = 48, heads: int = 3) -> None:
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(dim, dim * 3), nn.Linear(dim, dim), heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


def test_a_built_attention_matches_torch_with_its_data_movement_scheduled():
    torch.manual_seed(0)
    art = cpu_build_checked(_Attention().eval(), torch.randn(2, 11, 48))
    # the qkv split and the head merge: scheduled, not left as chains of copies
    assert not [k for k in art.kernels.get("unscheduled", []) if "transpose" in k], art.kernels
    assert [k for k in art.kernels["scheduled"] if "transpose" in k]
