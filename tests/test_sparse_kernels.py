"""rwdeploy's TIR conv / linear kernels against torch over random shapes (float and int8 values).

Each test builds many kernels into one library (one LLVM run) and compares every one with
torch's dense computation of the same weights; shapes, strides, paddings, groups, block shapes,
epilogues (row scale, residual, ReLU / clip) and layouts (direct, shift, im2col) are drawn at
random from a fixed seed, plus hand-picked cases for each layout and the pointwise + depthwise
fusion.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm

from rwdeploy.runtime import tvm_conv_kernels as K
from rwdeploy.runtime.tvm_kernels import LinearSpec, kernel_for, linear_scale_shape, scratch_shapes
from rwdeploy.runtime.tvm_sparse import host_target
from rwdeploy.sparse import pack

DEV = tvm.cpu()


def _tensor(a: np.ndarray) -> tvm.runtime.Tensor:
    return tvm.runtime.tensor(np.ascontiguousarray(a), DEV)


def _int8(values: np.ndarray, rows: np.ndarray, n_rows: int, br: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row power-of-two scales and int8 values for float `values` (nnzb, br, bc)."""
    amax = np.zeros((n_rows // br, br), np.float32)
    np.maximum.at(amax, rows, np.abs(values).max(axis=2))
    amax = amax.reshape(n_rows)
    scale = np.where(amax > 0, 2.0 ** np.ceil(np.log2(np.maximum(amax, 1e-30) / 127)), 1.0).astype(np.float32)
    q = np.clip(np.round(values / scale.reshape(-1, br, 1)[rows]), -128, 127).astype(np.int8)
    return q, scale


def _dense(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape: tuple, block: tuple) -> np.ndarray:
    """The dense weight of BSR blocks (nnzb, br, bc) at block (rows, cols)."""
    br, bc = block
    w = np.zeros((shape[0], int(np.prod(shape[1:]))), np.float32)
    for v, r, c in zip(values, rows, cols.astype(np.int64)):
        w[r * br:(r + 1) * br, c * bc:(c + 1) * bc] = v
    return w.reshape(shape)


class ConvCase:
    """One conv kernel call: spec, arrays, and the torch reference output."""

    def __init__(self, rng, c, o, h, w, k, stride, pad, dil, groups, block, act, residual, int8, sparsity,
                 weight=None):
        self.w = rng.standard_normal((o, c // groups, *k)).astype(np.float32)
        self.w[rng.random(self.w.shape) < sparsity] = 0
        if weight is not None:
            self.w = weight
        m = pack(torch.from_numpy(self.w.reshape(o, -1)), block)
        nnzb = m.nnz_blocks
        self.spec = K.ConvSpec(2, c, h, w, o, k, stride, pad, dil, groups, "sparse", nnzb, block, "int32",
                               act, (-0.5, 0.75), residual, "int8" if int8 else "float32", row_scale=not int8)
        g = K.conv_geometry(self.spec)
        rows = np.repeat(np.arange(o // block[0]), np.diff(m.indptr.numpy()))
        vals = m.values.numpy()
        scale = rng.uniform(0.5, 2.0, o).astype(np.float32)     # a folded batch norm
        if int8:
            vals, scale = _int8(vals, rows, o, block[0])
        if int8:   # the weights the int8 kernel computes with: values times row scales
            deq = vals.astype(np.float32) * scale.reshape(-1, block[0], 1)[rows]
            w_eff = _dense(deq, rows, m.indices.numpy(), self.w.shape, block)
        else:      # float values with a row scale (a folded batch norm)
            w_eff = self.w * scale.reshape(-1, 1, 1, 1)
        off = K.slot_offsets_numpy(g, m.indices.numpy(), np)
        if nnzb == 0:
            vals, off = np.zeros((1, block[0], 1), vals.dtype), np.zeros(1, np.int32)
        self.x = rng.standard_normal((2, c, h, w)).astype(np.float32)
        bias = rng.standard_normal(o).astype(np.float32)
        oh, ow = self.spec.out_hw
        res = rng.standard_normal((2, o, oh, ow)).astype(np.float32) if residual else np.zeros(1, np.float32)
        ref = F.conv2d(torch.from_numpy(self.x), torch.from_numpy(w_eff), torch.from_numpy(bias), stride, pad, dil,
                       groups)
        if residual:
            ref = ref + torch.from_numpy(res)
        ref = {"none": ref, "relu": torch.relu(ref), "clip": ref.clamp(-0.5, 0.75),
               "hardswish": F.hardswish(ref), "silu": F.silu(ref)}[act]
        self.ref = ref.numpy()
        indptr = m.indptr.numpy()
        if g.kblock:
            indptr = K.split_indptr_numpy(m.indices.numpy(), indptr, g.kblocks, K.kblock_span(g), np)
        self.weights = [vals, off, indptr, scale, bias, res]
        self.origins = K.slot_origins(g, np)
        self.layout = g.layout

    def run(self, lib) -> np.ndarray:
        s = self.spec
        y = _tensor(np.full((2, s.out_channels, *s.out_hw), np.nan, np.float32))
        w = [_tensor(a) for a in self.weights]
        if s.groups > 1:
            lib[s.name()](_tensor(self.x), *w, _tensor(self.origins),
                          _tensor(np.full(K.scratch_shape(s), np.nan, np.float32)), y)
        elif self.layout == "direct":
            lib[s.name()](_tensor(self.x.reshape(2, s.in_channels, -1)), *w, y)
        else:
            g = K.conv_geometry(s)
            xt = _tensor(np.full((2, g.slots, g.plane), np.nan, np.float32))
            lib[s.transform_name()](_tensor(self.x), _tensor(self.origins), xt)
            lib[s.name()](xt, *w, y)
        return y.numpy()


def _random_cases(seed: int, n: int) -> list[ConvCase]:
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < n:
        groups = int(rng.choice([1, 1, 2, 4]))
        depthwise = rng.random() < 0.2
        c = groups * int(rng.integers(1, 6)) if not depthwise else int(rng.integers(2, 9))
        groups = c if depthwise else groups
        o = groups * int(rng.choice([1, 2, 4, 8])) if not depthwise else c
        k = tuple(int(v) for v in rng.choice([1, 2, 3, 5], 2))
        stride = tuple(int(v) for v in rng.choice([1, 1, 2, 3], 2))
        dil = tuple(int(v) for v in rng.choice([1, 1, 2], 2))
        pad = tuple(int(rng.integers(0, kk)) for kk in k)
        h, w = (int(v) for v in rng.integers(max(k) * 2, 20, 2))
        br = int(rng.choice([1, 1, 4])) if (o // groups) % 4 == 0 else 1
        act = str(rng.choice(["none", "relu", "clip", "hardswish", "silu"]))
        cases.append(ConvCase(rng, c, o, h, w, k, stride, pad, dil, groups, (br, 1), act,
                              bool(rng.random() < 0.4), bool(rng.random() < 0.3), float(rng.uniform(0.3, 0.97))))
    return cases


def _fixed_cases() -> list[ConvCase]:
    rng = np.random.default_rng(7)
    f = lambda *a: ConvCase(rng, *a)  # noqa: E731
    return [
        f(16, 32, 16, 16, (1, 1), (1, 1), (0, 0), (1, 1), 1, (1, 1), "relu", True, False, 0.9),   # direct
        f(8, 16, 28, 28, (3, 3), (1, 1), (1, 1), (1, 1), 1, (1, 1), "clip", False, False, 0.9),  # shift
        f(8, 16, 70, 70, (3, 3), (1, 1), (1, 1), (1, 1), 1, (4, 1), "relu", True, True, 0.8),    # column chunks
        f(3, 8, 35, 33, (7, 7), (2, 2), (3, 3), (1, 1), 1, (1, 1), "relu", False, False, 0.5),   # phases
        f(32, 32, 2, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1, (1, 1), "relu", False, True, 0.95),   # im2col
        f(16, 16, 12, 12, (3, 3), (2, 2), (1, 1), (1, 1), 16, (1, 1), "clip", False, False, 0.6),  # depthwise
        f(8, 8, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, (1, 1), "none", True, False, 1.0),       # all zero
    ]


def _kblocked_cases() -> list[ConvCase]:
    """Convs whose tiles read more input than L1 holds: the reduction is cut into k-blocks."""
    rng = np.random.default_rng(11)
    f = lambda *a: ConvCase(rng, *a)  # noqa: E731
    return [
        f(160, 32, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1, (1, 1), "relu", True, False, 0.9),    # 3 blocks, ragged
        f(96, 24, 14, 14, (3, 3), (2, 2), (1, 1), (1, 1), 1, (1, 1), "clip", False, True, 0.8),   # phases, int8
        f(384, 16, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1, (4, 1), "none", False, False, 0.9),   # BSR 4x1
        f(150, 8, 9, 9, (3, 3), (1, 1), (2, 2), (2, 2), 1, (1, 1), "silu", True, False, 0.95),    # dilated
        f(160, 70, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1, (1, 1), "relu", False, False, 0.9),   # 2 tasks of rows
    ]


@pytest.mark.parametrize("which", ["layouts", "random", "kblocked"])
def test_conv_kernels_match_torch(which):
    cases = {"layouts": _fixed_cases, "random": lambda: _random_cases(0, 14), "kblocked": _kblocked_cases}[which]()
    if which == "kblocked":   # the cases exercise what they are for
        assert all(K.conv_geometry(c.spec).kblocks >= K.MIN_KBLOCKS for c in cases)
    else:
        assert not any(K.conv_geometry(c.spec).kblock for c in cases)
    funcs = {}
    for c in cases:
        funcs[c.spec.name()] = K.conv_kernel(c.spec)
        t = K.transform_for(c.spec)
        if t is not None:
            funcs[c.spec.transform_name()] = t
    lib = tvm.compile(tvm.IRModule(funcs), target=host_target())
    layouts = set()
    for c in cases:
        y = c.run(lib)
        scale = max(float(np.abs(c.ref).max()), 1.0)
        np.testing.assert_allclose(y, c.ref, rtol=1e-4, atol=1e-5 * scale, err_msg=K.describe(c.spec))
        layouts.add(c.layout)
    if which == "layouts":
        assert layouts == {"direct", "shift", "im2col"}


def test_pointwise_depthwise_fusion_matches_torch():
    """A 1x1 conv (+ scale, clip) computed inside the depthwise kernel that reads it, from its
    input rearranged in the depthwise layout: strides 1 and 2, odd and even sides, a dilated
    and a 5x5 depthwise conv, filters that read one stride phase only, all-zero filters and
    an all-zero 1x1 conv; the scratch starts as NaN, so a padding zero the kernel fails to
    write shows."""
    rng = np.random.default_rng(3)
    cases = [  # (stride, side, int8, depthwise kernel, padding, dilation, dw sparsity, 1x1 sparsity)
        (1, 9, False, 3, 1, 1, 0.5, 0.6), (2, 12, True, 3, 1, 1, 0.5, 0.6), (2, 7, False, 3, 1, 1, 0.5, 0.6),
        (2, 11, False, 3, 1, 1, 0.9, 0.6), (1, 10, False, 5, 2, 1, 0.8, 0.6), (1, 13, False, 3, 2, 2, 0.7, 0.6),
        (2, 9, False, 3, 1, 1, 0.0, 0.6), (2, 8, False, 3, 1, 1, 0.5, 1.0), (1, 5, False, 3, 1, 1, 0.9, 0.0),
    ]
    for stride, hw, int8, k, pad, dil, dw_sparsity, pw_sparsity in cases:
        pw = ConvCase(rng, 6, 12, hw, hw, (1, 1), (1, 1), (0, 0), (1, 1), 1, (1, 1), "clip", False, int8, pw_sparsity)
        weight = None
        if dw_sparsity == 0.9:   # one stored tap per filter: most filters read one stride phase of four
            weight = np.zeros((12, 1, k, k), np.float32)
            weight[np.arange(12), 0, rng.integers(0, k, 12), rng.integers(0, k, 12)] = rng.standard_normal(12)
            weight[rng.random(12) < 0.3] = 0     # and some filters store nothing
        dw = ConvCase(rng, 12, 12, hw, hw, (k, k), (stride, stride), (pad, pad), (dil, dil), 12, (1, 1), "relu",
                      False, False, dw_sparsity, weight)
        ref = F.conv2d(torch.from_numpy(pw.ref), torch.from_numpy(dw.w * dw.weights[3].reshape(-1, 1, 1, 1)),
                       torch.from_numpy(dw.weights[4]), stride, pad, dil, 12).relu().numpy()
        lib = tvm.compile(tvm.IRModule({
            "f": K.fused_pointwise_depthwise_kernel(pw.spec, dw.spec).with_attr("global_symbol", "f"),
            "t": K.fused_input_transform(pw.spec, dw.spec).with_attr("global_symbol", "t")}), target=host_target())
        gi = K.fused_input_geometry(pw.spec, dw.spec)
        xt = _tensor(np.full((2, gi.slots, gi.plane), np.nan, np.float32))
        lib["t"](_tensor(pw.x), _tensor(K.slot_origins(gi, np)), xt)
        poff = K.slot_offsets_numpy(K.fused_pointwise_geometry(pw.spec, dw.spec),
                                    pack(torch.from_numpy(pw.w.reshape(12, -1))).indices.numpy(), np)
        vals, off, ptr, scale, bias, _ = pw.weights
        if pw.spec.nnz_blocks == 0:
            poff = off
        outs = [_tensor(np.full(s, np.nan, np.float32)) for s in K.fused_scratch_shapes(pw.spec, dw.spec)]
        y = _tensor(np.full(ref.shape, np.nan, np.float32))
        lib["f"](xt, _tensor(vals), _tensor(poff), _tensor(ptr), _tensor(scale), _tensor(bias),
                 *[_tensor(a) for a in dw.weights], *outs, y)
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(ref).max())),
                                   err_msg=f"stride {stride} side {hw} k{k} p{pad} d{dil}")




@pytest.mark.parametrize("int8", [False, True])
def test_linear_kernels_match_torch(int8):
    rng = np.random.default_rng(11 + int8)
    cases = []
    for batch, n, k, block in [(1, 48, 70, (1, 1)), (1, 32, 64, (1, 4)), (1, 32, 64, (4, 1)), (1, 64, 40, (8, 1)),
                               (3, 32, 64, (1, 1)), (5, 16, 24, (4, 1)), (1, 40, 300, (1, 1))]:
        w = rng.standard_normal((n, k)).astype(np.float32)
        w[rng.random(w.shape) < rng.uniform(0.4, 0.95)] = 0
        m = pack(torch.from_numpy(w), block)
        vals, scale = m.values.numpy(), np.ones(1, np.float32)
        rows = np.repeat(np.arange(n // block[0]), np.diff(m.indptr.numpy()))
        if int8:
            vals, scale = _int8(vals, rows, n, block[0])
            w = _dense(vals.astype(np.float32) * scale.reshape(-1, block[0], 1)[rows], rows, m.indices.numpy(),
                       w.shape, block)
        spec = LinearSpec(batch, n, k, "sparse", m.nnz_blocks, block, str(m.indices.dtype).replace("torch.", ""),
                          values="int8" if int8 else "float32", act=str(rng.choice(["none", "relu"])))
        assert scale.shape == linear_scale_shape(spec)
        x = rng.standard_normal((batch, k)).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32)
        ref = x @ w.T + bias
        ref = np.maximum(ref, 0) if spec.act == "relu" else ref
        cases.append((spec, [x, vals, m.indices.numpy(), m.indptr.numpy(), bias, scale], ref))
    lib = tvm.compile(tvm.IRModule({s.name(): kernel_for(s) for s, _, _ in cases}), target=host_target())
    for spec, arrays, ref in cases:
        y = _tensor(np.full(ref.shape, np.nan, np.float32))
        scratch = [_tensor(np.zeros(sh, np.float32)) for sh in scratch_shapes(spec)]
        lib[spec.name()](*[_tensor(a) for a in arrays], *scratch, y)
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(ref).max())),
                                   err_msg=str(spec))


def test_epilogue_exp_matches_numpy_over_the_float_range():
    """The SiLU epilogue's polynomial exp (vectorised): relative error against float64 exp
    over [-87, 88] (where it is not clamped), and SiLU against torch far outside it."""
    from tvm.script import tirx as T

    n = 1 << 14

    @T.prim_func
    def f(x: T.Buffer((n,), "float32"), e: T.Buffer((n,), "float32"), s: T.Buffer((n,), "float32")):
        for o in range(n // 16):
            for i in T.vectorized(16):
                e[o * 16 + i] = K._exp(x[o * 16 + i])
                s[o * 16 + i] = x[o * 16 + i] / (T.float32(1) + K._exp(-x[o * 16 + i]))

    lib = tvm.compile(tvm.IRModule({"f": f.with_attr("global_symbol", "f")}), target=host_target())
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-87, 88, n // 2), rng.standard_normal(n // 4) * 4,
                        rng.uniform(-1e4, 1e4, n // 4)]).astype(np.float32)
    e, s = (_tensor(np.full(n, np.nan, np.float32)) for _ in range(2))
    lib["f"](_tensor(x), e, s)
    inside = np.abs(x) <= 87
    exact = np.exp(x[inside].astype(np.float64))
    assert np.max(np.abs(e.numpy()[inside] - exact) / exact) < 5e-7
    ref = F.silu(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(s.numpy(), ref, rtol=5e-7, atol=1e-6)


def test_accumulators_are_on_the_stack():
    """A task's accumulator must be a stack array, not a TVM workspace buffer: LLVM assumes a
    workspace aliases the weights, stores the accumulator and reloads the row pointer on every
    step of the inner loop. Only the k-blocked kernel's partial sums (16 KB) are a workspace."""
    rng = np.random.default_rng(5)
    plain = ConvCase(rng, 16, 16, 12, 12, (3, 3), (1, 1), (1, 1), (1, 1), 1, (1, 1), "relu", False, False, 0.8)
    blocked = _kblocked_cases()[0]
    depthwise = ConvCase(rng, 8, 8, 12, 12, (3, 3), (1, 1), (1, 1), (1, 1), 8, (1, 1), "relu", False, False, 0.5)
    for case, workspaces in ((plain, 0), (blocked, 1), (depthwise, 0)):
        lib = tvm.compile(tvm.IRModule({case.spec.name(): K.conv_kernel(case.spec)}), target=host_target())
        ir = lib.mod.inspect_source("ll")   # workspaces are called through this pointer
        allocs = ir.count("load ptr, ptr @__TVMBackendAllocWorkspace")
        assert allocs == workspaces, K.describe(case.spec)
