"""Packed models imported into TVM Relax run rwdeploy's TIR kernels and match the dense model."""
import numpy as np
import pytest
import torch
import tvm
from torch import nn

from rwdeploy.runtime import tvm_sparse
from rwdeploy.sparse import CsrConv2d, CsrLinear


def _sparsify(layer, frac, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight[torch.rand(layer.weight.shape, generator=g) < frac] = 0
    return layer.eval()


class Net(nn.Module):
    """Every kernel family once: strided grouped 3x3 (4x1 blocks), dilated 3x3, 1x1, empty
    weight, and linear as CSR / 1x4 / 4x1 / 8x1."""

    def __init__(self):
        super().__init__()
        self.c1 = _sparsify(nn.Conv2d(4, 16, 3, stride=2, padding=1, groups=2), 0.7, 1)
        self.c2 = _sparsify(nn.Conv2d(16, 16, 3, padding=2, dilation=2), 0.9, 2)
        self.c3 = _sparsify(nn.Conv2d(16, 8, 1, bias=False), 0.8, 3)
        self.c4 = _sparsify(nn.Conv2d(8, 8, (1, 3), padding=(0, 1)), 1.0, 4)   # all zero
        self.f1 = _sparsify(nn.Linear(8 * 5 * 5, 32), 0.9, 5)
        self.f2 = _sparsify(nn.Linear(32, 16), 0.5, 6)
        self.f3 = _sparsify(nn.Linear(16, 16, bias=False), 0.5, 7)
        self.f4 = _sparsify(nn.Linear(16, 8), 0.5, 8)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = self.c4(self.c3(torch.relu(self.c2(x)))) + x[:, :8]
        x = torch.relu(self.f1(x.flatten(1)))
        return self.f4(self.f3(self.f2(x)))


def _packed(net):
    p = Net()
    p.load_state_dict(net.state_dict())
    for name, block in [("c1", (4, 1)), ("c2", (1, 1)), ("c3", (8, 1)), ("c4", (1, 1))]:
        setattr(p, name, CsrConv2d.from_dense(getattr(net, name), block))
    for name, block in [("f1", (1, 1)), ("f2", (1, 4)), ("f3", (4, 1)), ("f4", (8, 1))]:
        setattr(p, name, CsrLinear.from_dense(getattr(net, name), block))
    return p.eval()


@pytest.mark.parametrize("batch,decompose", [(1, False), (3, True)])
def test_relax_import_uses_tir_kernels_and_matches_dense(batch, decompose):
    """decompose=True: the path of runtime.tvm_build (ATen decomposition on, sparse converters
    only); the custom ops are not decomposed and still reach their converters."""
    net = Net().eval()
    packed = _packed(net)
    x = torch.randn(batch, 4, 10, 10)
    ref = net(x).detach().numpy()
    ep = torch.export.export(packed, (x,))
    if decompose:
        from tvm.relax.frontend.torch import from_exported_program

        mod = tvm_sparse.fold_weight_arithmetic(   # as runtime.tvm_build.import_relax does
            from_exported_program(ep, unwrap_unit_return_tuple=True,
                                  custom_convert_map=tvm_sparse.convert_map(dense_kernels=False)))
    else:
        mod = tvm_sparse.import_exported_program(ep)
    script = mod.script()
    assert script.count("R.call_tir") >= 7          # every non-empty packed layer
    assert "rw_conv2d_sparse" in script and "rw_linear_sparse" in script
    kernels = [f for gv, f in mod.functions.items() if gv.name_hint.startswith("rw_")]
    assert kernels and all(bool(f.attrs["tirx.is_scheduled"]) for f in kernels)   # schedulers skip them
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, target=tvm_sparse.host_target()), tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_time_candidates_runs_dense_and_sparse_kernels():
    lin = _sparsify(nn.Linear(64, 32), 0.9, 0)
    conv = _sparsify(nn.Conv2d(8, 8, 3, padding=1), 0.9, 1)
    from rwdeploy.sparse import pack
    from rwdeploy.runtime.layer_formats import measure_layer_formats
    out = measure_layer_formats([
        ("lin", lin, [1, 64], {"csr": pack(lin.weight)}),
        ("conv", conv, [1, 8, 6, 6], {"bsr4x1": pack(conv.weight.reshape(8, -1), (4, 1))}),
    ])
    assert set(out["lin"]) == {"dense", "ref:dense_torch", "csr"}
    assert set(out["conv"]) == {"dense", "ref:dense_torch", "bsr4x1"}
    assert all(v["median_ms"] > 0 for layer in out.values() for v in layer.values())


def test_dense_layers_use_scheduled_kernels():
    net = Net().eval()
    packed = _packed(net)
    packed.f2 = net.f2                      # dense layers stay nn.Linear / nn.Conv2d
    packed.c1 = net.c1
    x = torch.randn(2, 4, 10, 10)
    ref = net(x).detach().numpy()
    mod = tvm_sparse.import_exported_program(torch.export.export(packed, (x,)))
    script = mod.script()
    assert "rw_conv2d_dense" in script and "rw_linear_dense" in script
    assert "R.nn.conv2d" not in script and "R.matmul" not in script
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, target=tvm_sparse.host_target()), tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_kernels_compile_for_aarch64():
    """Target-agnostic TIR: the same kernels build for aarch64 NEON (run by the arm target)."""
    from rwdeploy.runtime.tvm_kernels import ConvSpec, LinearSpec, kernel_for

    specs = [LinearSpec(1, 32, 64, "sparse", 40, (1, 1), "uint8"),
             LinearSpec(2, 32, 64, "sparse", 10, (4, 1), "uint8"),
             ConvSpec(1, 8, 6, 6, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, "sparse", 30, (1, 1), "uint8")]
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    lib = tvm.compile(tvm.IRModule({s.name(): kernel_for(s) for s in specs}), target=target)
    asm = lib.mod.inspect_source("asm")
    assert "fmla" in asm or "fmadd" in asm                 # aarch64 multiply-add instructions


class _WideConv(nn.Module):
    """A conv whose tile reads more input than L1 holds (160 channels at 7x7): k-blocked."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return torch.relu(self.conv(x))


@pytest.mark.parametrize("decompose", [False, True])
def test_kblocked_conv_row_pointers_are_folded_and_match_torch(decompose):
    """The k-blocked kernel's row pointers come from the weights: numpy where the importer
    hands over constants, else a TIR function whose call `fold_weight_arithmetic` evaluates."""
    conv = _sparsify(nn.Conv2d(160, 24, 3, padding=1), 0.9, 9)
    x = torch.randn(1, 160, 7, 7)
    ref = torch.relu(conv(x)).detach().numpy()
    ep = torch.export.export(_WideConv(CsrConv2d.from_dense(conv)).eval(), (x,))
    if decompose:
        from tvm.relax.frontend.torch import from_exported_program

        mod = tvm_sparse.fold_weight_arithmetic(
            from_exported_program(ep, unwrap_unit_return_tuple=True,
                                  custom_convert_map=tvm_sparse.convert_map(dense_kernels=False)))
    else:
        mod = tvm_sparse.import_exported_program(ep)
    script = mod.script()
    assert "shift/kb" in script                       # the layer is k-blocked ...
    assert "rw_conv2d_kptr_" not in script            # ... and its row pointers are constants
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, target=tvm_sparse.host_target()), tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_split_indptr_function_matches_numpy():
    """The TIR twin (for weights that are not constants at import) against numpy, on a CSR with
    empty rows and rows that skip whole k-blocks."""
    from rwdeploy.runtime import tvm_conv_kernels as K
    from rwdeploy.sparse import pack

    rng = np.random.default_rng(3)
    w = rng.standard_normal((12, 40 * 9)).astype(np.float32)
    w[rng.random(w.shape) < 0.95] = 0
    w[3] = 0
    w[5, :200] = 0
    m = pack(torch.from_numpy(w))
    cols, ptr = m.indices.numpy(), m.indptr.numpy()
    kblocks, span = 4, 9 * 11                    # 11 channels per block: the last one is short
    expect = K.split_indptr_numpy(cols, ptr, kblocks, span, np)
    assert expect[-1] == len(cols) and np.all(np.diff(expect) >= 0)
    f = K.split_indptr_func(12, kblocks, str(cols.dtype))
    lib = tvm.compile(tvm.IRModule({"f": f}), target=tvm_sparse.host_target())
    out = tvm.runtime.tensor(np.full(12 * kblocks + 1, -1, np.int32))
    lib[K.split_indptr_name(12, kblocks, str(cols.dtype))](
        tvm.runtime.tensor(cols), tvm.runtime.tensor(ptr), tvm.runtime.tensor(np.array([kblocks, span], np.int32)), out)
    np.testing.assert_array_equal(out.numpy(), expect)
    for r in range(12):                          # every piece holds exactly its row's block's columns
        for b in range(kblocks):
            piece = cols[expect[r * kblocks + b]:expect[r * kblocks + b + 1]]
            assert np.all(piece // span == b) and np.all((piece >= 0))
    with pytest.raises(ValueError, match="column order"):
        K.split_indptr_numpy(cols[::-1].copy(), ptr, kblocks, span, np)


class _WideInvertedResidual(nn.Module):
    """MobileNetV2's last block shape: a 1x1 conv that alone would be k-blocked (160 channels at
    7x7) feeding a depthwise conv, which computes it inside its own kernel (not blocked)."""

    def __init__(self, pw, dw, pj):
        super().__init__()
        self.pw, self.dw, self.pj = pw, dw, pj

    def forward(self, x):
        return self.pj(torch.relu(self.dw(torch.relu(self.pw(x))))) + x


def test_pointwise_fused_into_depthwise_is_not_kblocked():
    from rwdeploy.runtime import tvm_build

    pw = _sparsify(nn.Conv2d(160, 960, 1), 0.9, 10)
    dw = _sparsify(nn.Conv2d(960, 960, 3, padding=1, groups=960), 0.5, 11)
    pj = _sparsify(nn.Conv2d(960, 160, 1), 0.9, 12)
    x = torch.randn(1, 160, 7, 7)
    ref = _WideInvertedResidual(pw, dw, pj).eval()(x).detach().numpy()
    packed = _WideInvertedResidual(CsrConv2d.from_dense(pw), CsrConv2d.from_dense(dw), CsrConv2d.from_dense(pj)).eval()
    mod = tvm_build.import_relax(packed, x, None)
    script = mod.script()
    assert "rw_conv2d_pwdw_" in script and "shift/kb" in script    # fused, and the projection blocked
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, target=tvm_sparse.host_target()), tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


class _BorderThenBatchNorm(nn.Module):
    """What `remove_zero_channels` leaves where a removed channel's constant output reaches a
    zero-padded conv: a border map added between the conv and its batch norm; and a batch norm
    on the input, which follows no conv."""

    def __init__(self):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.border = nn.Parameter(torch.randn(6, 1, 3, 3), requires_grad=False)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        ones = self.border.new_ones((1, 1, 8, 8))
        y = self.conv(self.bn0(x)) + torch.conv2d(ones, self.border, None, (1, 1), (1, 1), (1, 1))
        return torch.relu(self.bn(y))


def test_batch_norm_that_fuses_into_no_conv_matches_torch():
    """Undecomposed import (`import_exported_program`, dense kernels): a batch norm the conv
    kernel cannot take (after a fused residual / on the input) runs as inference arithmetic;
    TVM's own converter of aten.batch_norm read its momentum as eps in training mode."""
    torch.manual_seed(0)
    m = _BorderThenBatchNorm()
    for bn in (m.bn0, m.bn):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    m.eval()
    x = torch.randn(1, 4, 8, 8)
    ref = m(x).detach().numpy()
    mod = tvm_sparse.import_exported_program(torch.export.export(m, (x,)))
    assert "R.nn.batch_norm" not in mod.script()
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, target=tvm_sparse.host_target()), tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


class _FortyWide(nn.Module):
    """A 1x1 conv into a depthwise conv, then a 3x3 conv, on 40 x 40 maps (a 160 x 160 input
    at stride 4): rows of 40 outputs, tiles of 48 accumulator floats."""

    def __init__(self):
        super().__init__()
        self.pw = _sparsify(nn.Conv2d(8, 24, 1), 0.8, 20)
        self.dw = _sparsify(nn.Conv2d(24, 24, 3, padding=1, groups=24), 0.5, 21)
        self.c3 = _sparsify(nn.Conv2d(24, 16, 3, padding=1), 0.9, 22)

    def forward(self, x):
        return self.c3(torch.relu(self.dw(torch.relu(self.pw(x)))))


def test_forty_wide_rows_run_in_power_of_two_vectors():
    """A 48-float tile is three 16-float vector loops, not one <48 x float> LLVM vector (which
    x86 legalises into masked and scalar pieces: 3-4x slower on such layers); every kernel
    matches torch."""
    from rwdeploy.runtime import tvm_build
    from rwdeploy.runtime.tvm_conv_kernels import ConvSpec, conv_geometry

    net = _FortyWide().eval()
    x = torch.randn(1, 8, 40, 40)
    spec = ConvSpec(1, 24, 40, 40, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, "sparse", 10, (1, 1), "int32")
    assert conv_geometry(spec).tq == 48            # the case this test is about
    packed = _FortyWide()
    for name in ("pw", "dw", "c3"):
        setattr(packed, name, CsrConv2d.from_dense(getattr(net, name)))
    art = tvm_build.build(packed.eval(), x, "cpu", threads=1)
    ir = art.executable.mod.imports[0].inspect_source("ll")
    assert "rw_conv2d_pwdw_" in ir and "<16 x float>" in ir
    assert "<48 x float>" not in ir
    vm = tvm.relax.VirtualMachine(art.executable, tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
    ref = net(x).detach().numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_clear_losers_are_timed_once():
    from rwdeploy.runtime.layer_formats import CLEARLY_SLOWER, contenders, measure_layer_formats

    groups = {"a": "conv", "b": "conv", "c": "conv", "d": "fc", ("p", "q", "csr+csr"): ("p", "q")}
    first = {"a": 1.0, "b": CLEARLY_SLOWER, "c": CLEARLY_SLOWER * 1.01, "d": 9.0, ("p", "q", "csr+csr"): 50.0}
    assert contenders(first, groups) == {"a", "b", "d", ("p", "q", "csr+csr")}   # each group's best, and ties
    conv = _sparsify(nn.Conv2d(16, 16, 3, padding=1), 0.95, 3)
    from rwdeploy.sparse import pack
    out = measure_layer_formats([("conv", conv, [1, 16, 14, 14], {"csr": pack(conv.weight.reshape(16, -1))})])
    ns = {alt: v["n"] for alt, v in out["conv"].items() if not alt.startswith("ref:")}
    assert set(ns.values()) <= {1, 5} and 5 in ns.values()      # every layer's fastest gets all five rounds
