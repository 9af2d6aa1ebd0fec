"""Softmax and layer norm over the last axis as row kernels (`tvm_row_kernels`) in cpu builds,
against float64 torch, and a transformer block built from torch against torch."""
import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

from rwdeploy.runtime import tvm_build
from rwdeploy.runtime.tvm_build import cpu_pipeline
from rwdeploy.runtime.tvm_sparse import host_target

# rows shorter than a vector, exactly one, one and a tail, ViT's 197 (12 vectors and 5)
SHAPES = [(2, 5), (4, 16), (2, 33), (3, 197, 197)]


def _build(shape, make):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(make(x)))
        bb.emit_func_output(out)
    target = host_target()
    executable = tvm.compile(bb.get(), target=target, relax_pipeline=cpu_pipeline(target, {}))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return (lambda a: vm["main"](tvm.runtime.tensor(a)).numpy()), executable.mod.imports[0].inspect_source("ll")


@pytest.mark.parametrize("shape", SHAPES)
def test_softmax_rows_match_float64(shape):
    run, ir = _build(shape, lambda x: relax.op.nn.softmax(x, axis=-1))
    assert "rw_softmax_rows" in ir
    x = (np.random.default_rng(0).standard_normal(shape) * 6).astype(np.float32)
    x.flat[:3] = [-100.0, 100.0, 0.0]
    y = run(x)
    ref = torch.softmax(torch.from_numpy(x).double(), -1).numpy()
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-6)
    small = ref > 1e-30
    assert (np.abs(y - ref)[small] / ref[small]).max() < 1e-5
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False)])
def test_layer_norm_rows_match_float64(shape, center, scale):
    n = shape[-1]
    gamma, beta = np.linspace(0.5, 2, n, dtype=np.float32), np.linspace(-1, 1, n, dtype=np.float32)
    run, ir = _build(shape, lambda x: relax.op.nn.layer_norm(
        x, relax.const(gamma), relax.const(beta), axes=[-1], epsilon=1e-5, center=center, scale=scale))
    assert "rw_layer_norm_rows" in ir
    rng = np.random.default_rng(1)
    # rows far from zero with a small spread: E[x^2] - mean^2 in float32 cancels to noise there
    x = (1000 + rng.standard_normal(shape) * 0.05).astype(np.float32)
    x[0] = rng.standard_normal(shape[1:]).astype(np.float32) * 3
    xt = torch.from_numpy(x).double()
    ref = torch.nn.functional.layer_norm(xt, (n,), eps=1e-5)
    if scale:
        ref = ref * torch.from_numpy(gamma).double()
    if center:
        ref = ref + torch.from_numpy(beta).double()
    # a float32 mean near 1000 is off by up to ~1e-4, 2e-3 of a 0.05 spread, so ~1e-2 of a unit
    # output; E[x^2] - mean^2 (TVM's lowering) has ulp(1e6) = 0.06 against a variance of 0.0025
    np.testing.assert_allclose(run(x), ref.numpy(), rtol=0, atol=1e-2)
    np.testing.assert_allclose(run(x)[0], ref.numpy()[0], rtol=0, atol=2e-5)


class Attention(nn.Module):
    """A pre-norm transformer block as timm writes it: layer norm, scaled dot-product
    attention (softmax over the last axis), layer norm."""

    def __init__(self, dim: int = 48, heads: int = 3):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.norm2(x + self.proj(y.transpose(1, 2).reshape(b, n, c)))


def test_attention_block_matches_torch():
    torch.manual_seed(0)
    model = Attention().eval()
    with torch.no_grad():                    # non-trivial affine parameters
        for norm in (model.norm1, model.norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(1, 37, 48)
    art = tvm_build.build(model, x, "cpu", threads=1)
    vm = relax.VirtualMachine(art.executable, tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x.numpy()))
    y = (y[0] if isinstance(y, (list, tuple)) or not hasattr(y, "numpy") else y).numpy()
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


class MaskedAttention(nn.Module):
    """Scaled dot-product attention with a boolean mask whose first query row masks every key:
    torch gives that row zeros (`_safe_softmax`), not NaN."""

    def __init__(self, dim: int = 24, tokens: int = 21):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        mask = torch.rand(tokens, tokens, generator=torch.Generator().manual_seed(3)) > 0.3
        mask[0] = False
        mask[1:, 0] = True                      # every other row keeps a key
        self.register_buffer("mask", mask)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


def test_safe_softmax_of_export_is_one_row_kernel_and_matches_torch():
    torch.manual_seed(0)
    model = MaskedAttention().eval()
    x = torch.randn(1, 21, 24)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.all(ref[0, 0, 0] == 0) and np.isfinite(ref).all()
    art = tvm_build.build(model, x, "cpu", threads=1)
    ir = art.executable.mod.imports[0].inspect_source("ll")
    assert "rw_safe_softmax_rows" in ir                # the where / mask passes folded into it
    y = relax.VirtualMachine(art.executable, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    y = (y[0] if not hasattr(y, "numpy") else y).numpy()
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def test_safe_softmax_rows_of_minus_infinity_are_zero():
    from rwdeploy.runtime.tvm_row_kernels import softmax_rows

    x = np.random.default_rng(2).standard_normal((4, 37)).astype(np.float32)
    x[1] = -np.inf                                      # a fully masked row
    x[2, ::3] = -np.inf                                 # a partly masked one
    target = host_target()
    lib = tvm.compile(tvm.IRModule({"main": softmax_rows((4, 37), 16, safe=True)}), target=target)
    y = tvm.runtime.tensor(np.full((4, 37), np.nan, np.float32))
    lib["main"](tvm.runtime.tensor(x), y)
    ref = torch.softmax(torch.from_numpy(x).double(), -1).nan_to_num(0.0).numpy()
    np.testing.assert_allclose(y.numpy(), ref, rtol=0, atol=1e-6)
    assert (y.numpy()[1] == 0).all()


def test_broadcast_to_its_own_shape_is_no_kernel():
    """expand to the same shape before a bmm (how export writes attention) copies nothing."""
    shape = (1, 3, 19, 19)

    def make(x):
        return relax.op.reshape(relax.op.broadcast_to(relax.op.nn.softmax(x, axis=-1), shape), (3, 19, 19))

    run, ir = _build(shape, make)
    assert "broadcast" not in ir
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    ref = torch.softmax(torch.from_numpy(x).double(), -1).reshape(3, 19, 19).numpy()
    np.testing.assert_allclose(run(x), ref, rtol=0, atol=1e-6)
