"""Packed convs fuse their batch norm, activation and residual add (and a 1x1 conv feeding a
depthwise conv) into one kernel when imported into Relax, and still compute the model."""
import numpy as np
import pytest
import torch
import tvm
from torch import nn

from rwdeploy.passes.pack_sparse import pack_sparse
from rwdeploy.runtime import tvm_sparse


def _sparsify(model: nn.Module, frac: float, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight[torch.rand(m.weight.shape, generator=g) < frac] = 0
            if isinstance(m, nn.BatchNorm2d):      # non-trivial statistics, moderate scales
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
    return model.eval()


class Block(nn.Module):
    """conv-BN-ReLU; conv-BN + shortcut conv-BN, add, ReLU; 1x1-BN-ReLU6 -> depthwise-BN-ReLU6 -> 1x1-BN + x;
    and a conv whose output is read twice (not fusable)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(4, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.sc, self.bs = nn.Conv2d(16, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16)
        self.pw, self.bp = nn.Conv2d(16, 48, 1, bias=False), nn.BatchNorm2d(48)
        self.dw, self.bd = nn.Conv2d(48, 48, 3, padding=1, groups=48, bias=False), nn.BatchNorm2d(48)
        self.pj, self.bj = nn.Conv2d(48, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.tw = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)) + self.bs(self.sc(y)))
        z = nn.functional.relu6(self.bd(self.dw(nn.functional.relu6(self.bp(self.pw(y))))))
        y = self.bj(self.pj(z)) + y
        t = self.tw(y)
        return torch.cat([torch.relu(t), t * 0.5], 1)


@pytest.fixture(scope="module")
def packed_block():
    model = _sparsify(Block(), 0.6, 0)
    x = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(1))
    gm = torch.fx.symbolic_trace(model)
    res = pack_sparse(gm, x, mode="csr", min_sparsity=0.3)
    assert len(res.record.packed) == 7
    with torch.no_grad():
        ref = model(x).numpy()
    return res.gm, x, ref


def _check(y: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))


def test_plain_import_fuses_and_matches(packed_block):
    gm, x, ref = packed_block
    mod = tvm_sparse.import_exported_program(torch.export.export(gm, (x,)))
    script = mod["main"].script()
    assert "R.nn.batch_norm" not in script and "R.clip" not in script
    assert script.count("R.nn.relu(") == 1          # relu(t) of the conv read twice, unfused
    assert script.count("rw_conv2d_pwdw") == 1      # the 1x1 conv runs inside the depthwise kernel
    assert script.count("R.add") == 0               # both residual adds are kernel epilogues
    assert script.count("R.multiply") == 1          # t * 0.5: the conv read twice stays unfused
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, target=tvm_sparse.host_target()), tvm.cpu())
    _check(vm["main"](tvm.runtime.tensor(x.numpy())).numpy(), ref)


def test_product_build_fuses_and_matches(packed_block):
    """The compile pipeline's path: decomposed export (batch norm + getitem), CPU pipeline."""
    from rwdeploy.runtime.tvm_build import build, import_relax

    gm, x, ref = packed_block
    script = import_relax(gm, x)["main"].script()
    assert "R.nn.batch_norm" not in script and "rw_conv2d_pwdw" in script
    art = build(gm, x, "cpu")
    vm = tvm.relax.VirtualMachine(art.executable, tvm.cpu())
    _check(vm["main"](tvm.runtime.tensor(x.numpy())).numpy(), ref)


def test_int8_packed_model_matches_its_float_twin(packed_block):
    """int8 values with power-of-two row scales: torch eager and the TVM build agree with the
    float model whose weights are the dequantized int8 values (exactly representable)."""
    from rwdeploy.sparse import PACKED_TYPES
    from rwdeploy.sparse.quantize import quantize_packed

    gm, x, _ = packed_block
    for per_row in (True, False):
        q, rec = quantize_packed(gm, per_row=per_row)
        assert len(rec.layers) == 7 and all(l.bytes_after < l.bytes_before for l in rec.layers)
        layers = [m for m in q.modules() if isinstance(m, PACKED_TYPES)]
        assert all(m.values.dtype == torch.int8 and m.scale.shape == (m.matrix_shape[0],) for m in layers)
        if not per_row:
            assert all(bool((m.scale == m.scale[0]).all()) for m in layers)
        twin, _ = quantize_packed(q, per_row=per_row)      # already on the grid: nothing moves
        assert max(l.max_abs_change for l in _.layers) == 0.0
        with torch.no_grad():
            ref = q(x).numpy()
            float_twin = [m.to_dense() for m in layers]
        assert all(torch.equal(d.weight, m.matrix().to_dense().reshape(d.weight.shape))
                   for d, m in zip(float_twin, layers))
        mod = tvm_sparse.import_exported_program(torch.export.export(q, (x,)))
        assert "int8" in mod.script()
        vm = tvm.relax.VirtualMachine(tvm.compile(mod, target=tvm_sparse.host_target()), tvm.cpu())
        _check(vm["main"](tvm.runtime.tensor(x.numpy())).numpy(), ref)


class TwoBatches(nn.Module):
    """Two 3x3 convs of one shape, one over the batch and one over its first image: their
    input rearrangements have the same geometry but not the same batch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.b = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x):
        return self.a(x) + self.b(x[:1])


def test_convs_at_two_batch_sizes_build_and_match():
    model = _sparsify(TwoBatches(), 0.7, 3)
    x = torch.randn(2, 4, 10, 10, generator=torch.Generator().manual_seed(4))
    res = pack_sparse(torch.fx.symbolic_trace(model), x, mode="csr", min_sparsity=0.3)
    assert len(res.record.packed) == 2
    with torch.no_grad():
        ref = model(x).numpy()
    mod = tvm_sparse.import_exported_program(torch.export.export(res.gm, (x,)))
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, target=tvm_sparse.host_target()), tvm.cpu())
    _check(vm["main"](tvm.runtime.tensor(x.numpy())).numpy(), ref)


class MobileActivations(nn.Module):
    """conv-BN-hardswish; 1x1-BN-hardswish -> depthwise s2-BN-SiLU -> 1x1-SiLU (MobileNetV3 /
    EfficientNet activations after packed convs)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.pw, self.bp = nn.Conv2d(16, 48, 1, bias=False), nn.BatchNorm2d(48)
        self.dw, self.bd = nn.Conv2d(48, 48, 3, stride=2, padding=1, groups=48, bias=False), nn.BatchNorm2d(48)
        self.pj = nn.Conv2d(48, 24, 1)

    def forward(self, x):
        y = nn.functional.hardswish(self.b1(self.c1(x)))
        y = nn.functional.silu(self.bd(self.dw(nn.functional.hardswish(self.bp(self.pw(y))))))
        return nn.functional.silu(self.pj(y))


def test_hardswish_and_silu_are_conv_epilogues_and_match():
    """The product build keeps hardswish / SiLU whole after a packed conv and runs them in the
    kernel's epilogue (the 1x1 conv's inside the fused depthwise kernel), not as separate passes."""
    from rwdeploy.runtime.tvm_build import build, import_relax

    model = _sparsify(MobileActivations(), 0.6, 5)
    x = torch.randn(2, 3, 14, 14, generator=torch.Generator().manual_seed(6)) * 2
    res = pack_sparse(torch.fx.symbolic_trace(model), x, mode="csr", min_sparsity=0.3)
    assert len(res.record.packed) == 4
    with torch.no_grad():
        ref = model(x).numpy()
    layers = [str(f.attrs["rwdeploy.layer"]) for f in import_relax(res.gm, x).functions.values()
              if f.attrs is not None and "rwdeploy.layer" in f.attrs]
    assert sum("+hardswish" in d for d in layers) == 2 and sum("+silu" in d for d in layers) == 2, layers
    assert any("+hardswish, into" in d and d.endswith("+silu") for d in layers), layers   # fused pair
    art = build(res.gm, x, "cpu")
    vm = tvm.relax.VirtualMachine(art.executable, tvm.cpu())
    _check(vm["main"](tvm.runtime.tensor(x.numpy())).numpy(), ref)
