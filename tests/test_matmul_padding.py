"""Dense layers and attention matmuls whose extents no register tile or vector divides (ViT's
197 tokens, a prime) are computed padded and cut back: same results as torch, vector code."""
import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

from rwdeploy.runtime import tvm_build
from rwdeploy.runtime.tvm_build import cpu_pipeline
from rwdeploy.runtime.tvm_legalize import _padded_extents, padded_rows
from rwdeploy.runtime.tvm_sparse import host_target


def test_padding_is_chosen_only_where_nothing_divides():
    assert padded_rows(197, 576, 16, 32, 192 * 576 * 4) == 200
    assert padded_rows(196, 576, 16, 32, 192 * 576 * 4) == 196      # 14 x 14
    assert padded_rows(5, 576, 16, 32, 192 * 576 * 4) == 5          # a handful of rows: as they are
    assert _padded_extents(197, 197, 16) == (200, 208)
    assert _padded_extents(197, 64, 16) == (200, 64)                 # scores @ v: rows only
    assert _padded_extents(196, 64, 16) is None                      # 14 x 14 rows, whole vectors
    assert _padded_extents(8, 12, 16) is None                        # fewer columns than lanes


class Attention(nn.Module):
    """One head of self-attention on 197 tokens, with its projections."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        return self.proj(scores.softmax(-1) @ v)


def test_attention_on_197_tokens_matches_torch():
    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(1, 197, 32)
    art = tvm_build.build(model, x, "cpu", threads=1)
    y = relax.VirtualMachine(art.executable, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy())).numpy()
    ref = model(x).detach().numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("shapes", [((2, 3, 197, 16), (2, 3, 16, 197)), ((197, 24), (24, 53)),
                                    ((2, 3, 197, 197), (2, 3, 197, 64))])
def test_batch_matmul_padded_matches_numpy_and_vectorises(shapes):
    a_shape, b_shape = shapes
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType(a_shape, "float32"))
    b = relax.Var("b", relax.TensorType(b_shape, "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.matmul(a, b)))
        bb.emit_func_output(out)
    target = host_target()
    executable = tvm.compile(bb.get(), target=target, relax_pipeline=cpu_pipeline(target, {}))
    ir = executable.mod.imports[0].inspect_source("ll")
    from rwdeploy.runtime.tvm_schedule import vector_lanes
    lanes = vector_lanes(target)                            # 16 with AVX-512, 8 with AVX2
    assert f"llvm.fmuladd.v{lanes}f32" in ir                 # vector FMAs, not scalar code per column
    rng = np.random.default_rng(0)
    an, bn = rng.standard_normal(a_shape).astype(np.float32), rng.standard_normal(b_shape).astype(np.float32)
    y = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(an), tvm.runtime.tensor(bn)).numpy()
    ref = an.astype(np.float64) @ bn.astype(np.float64)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
