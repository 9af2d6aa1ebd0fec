"""A dense depthwise conv between packed layers runs in the packed layers' layout: no transposes.

The packed kernels keep activations in NCHW; TVM's CPU pipeline computes its own convs in NHWC,
so a dense conv it computed between two packed layers cost a transpose before and after it
(MobileNetV2 at 90 % sparsity: 24 transposes, 1.25 of 6.6 ms). A dense depthwise conv beside a
packed layer now runs rwdeploy's dense conv kernel in NCHW (fused with the 1x1 conv feeding it),
and the format choice times that kernel as the depthwise conv's "dense" alternative.
"""
import numpy as np
import pytest
import torch
import tvm
from torch import nn

from rwdeploy.models.imagenet import InvertedResidual
from rwdeploy.passes.pack_sparse import pack_sparse
from rwdeploy.runtime.tvm_build import build, import_relax

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYOUT_OPS = ("transpose", "permute_dims", "layout_transform")


def _blocks() -> nn.Module:
    """Two zoo MobileNetV2 blocks (1x1 expand -> depthwise 3x3 -> 1x1 project, BN, ReLU6): one
    with its residual add, one strided; 90 % of every weight zero, non-trivial BN statistics."""
    model = nn.Sequential(InvertedResidual(16, 16, 1, 6), InvertedResidual(16, 24, 2, 6))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight[torch.rand(m.weight.shape, generator=g) < 0.9] = 0
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
    return model.eval()


def _timer(dense: set[str] | None = None):
    """A pack_sparse measurer: "dense" fastest for depthwise layers and for the layers named in
    `dense`, CSR fastest for the others."""
    def timer(layers):
        out = {}
        for name, layer, _, cands in layers:
            keep = getattr(layer, "groups", 1) > 1 or name in (dense or set())
            out[name] = {alt: {"median_ms": 1.0 if (alt == "dense") == keep else 2.0} for alt in ("dense", *cands)}
        return out
    return timer


def _check(got: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def _run(art, x: torch.Tensor) -> np.ndarray:
    vm = tvm.relax.VirtualMachine(art.executable, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x.numpy())).numpy()


@pytest.fixture(scope="module")
def model_and_input():
    return _blocks(), torch.randn(1, 16, 14, 14, generator=torch.Generator().manual_seed(1))


def test_dense_depthwise_between_packed_layers_needs_no_transpose(model_and_input):
    model, x = model_and_input
    res = pack_sparse(torch.fx.symbolic_trace(model), x, timer=_timer())
    chosen = {l.name: l.chosen for l in res.record.layers}
    assert [n for n, c in chosen.items() if c == "dense"] == ["0.conv.3", "1.conv.3"]   # the depthwise convs
    assert sum(c == "csr" for c in chosen.values()) == 4

    script = import_relax(res.gm, x)["main"].script()
    assert not any(op in script for op in LAYOUT_OPS)
    assert "R.nn.conv2d" not in script                      # no conv left to TVM's NHWC pipeline
    assert script.count("rw_conv2d_pwdw") == 2              # each dense depthwise fuses its 1x1 conv

    art = build(res.gm, x, "cpu")
    kernels = [k for names in art.kernels.values() for k in names]
    assert kernels and not [k for k in kernels if any(op in k for op in LAYOUT_OPS)], kernels
    assert not [k for k in kernels if "conv2d" in k and not k.startswith("rw_conv2d")], kernels
    with torch.no_grad():
        _check(_run(art, x), model(x).numpy())


def test_depthwise_without_packed_neighbours_stays_tvm_conv(model_and_input):
    """The first block entirely dense, the second packed: the first depthwise conv has no packed
    neighbour and stays TVM's conv (NHWC beside its dense 1x1 convs); the second runs in NCHW."""
    model, x = model_and_input
    res = pack_sparse(torch.fx.symbolic_trace(model), x, timer=_timer({"0.conv.0", "0.conv.6"}))
    assert [l.name for l in res.record.packed] == ["1.conv.0", "1.conv.6"]
    script = import_relax(res.gm, x)["main"].script()
    assert script.count("R.nn.conv2d") == 3 and "groups=96" in script    # block 0: 1x1, depthwise, 1x1
    assert script.count("rw_conv2d_pwdw") == 1
    with torch.no_grad():
        _check(_run(build(res.gm, x, "cpu"), x), model(x).numpy())


def test_timer_candidates_compute_the_layer():
    """The format timer's candidates: a depthwise conv's "dense" runs in NCHW (the artifact's
    kernel beside packed layers), a groups=1 conv's takes and gives NCHW too, converting to and
    from the NHWC of TVM's conv as it must between packed neighbours (so its time includes the
    conversions); both equal torch, and so does the depthwise CSR form."""
    from rwdeploy.runtime.layer_formats import Candidate, build_candidates
    from rwdeploy.runtime.tvm_sparse import host_target
    from rwdeploy.sparse import pack

    g = torch.Generator().manual_seed(3)
    dw = nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24).eval()
    full = nn.Conv2d(8, 24, 3, padding=1).eval()
    with torch.no_grad():
        dw.weight[torch.rand(dw.weight.shape, generator=g) < 0.5] = 0
    x_dw, x_full = torch.randn(1, 24, 9, 9, generator=g), torch.randn(1, 8, 9, 9, generator=g)
    cands = [Candidate("dw\0dense", dw, tuple(x_dw.shape)),
             Candidate("dw\0csr", dw, tuple(x_dw.shape), pack(dw.weight.reshape(24, -1)), 1),
             Candidate("full\0dense", full, tuple(x_full.shape), None, 2)]
    assert [c.input_shape() for c in cands] == [(1, 24, 9, 9), (1, 24, 9, 9), (1, 8, 9, 9)]
    vm = tvm.relax.VirtualMachine(build_candidates(cands, host_target()), tvm.cpu())
    with torch.no_grad():
        ref_dw, ref_full = dw(x_dw).numpy(), full(x_full).numpy()
    for c in cands[:2]:
        _check(vm[c.function](tvm.runtime.tensor(x_dw.numpy())).numpy(), ref_dw)
    _check(vm[cands[2].function](tvm.runtime.tensor(x_full.numpy())).numpy(), ref_full)
