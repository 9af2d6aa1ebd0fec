"""The rwdeploy::sparse_* custom ops and packed layers against dense torch computations."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from rwdeploy.sparse import CsrConv2d, CsrLinear


def _sparsify(layer, frac, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight[torch.rand(layer.weight.shape, generator=g) < frac] = 0
    return layer.eval()


@settings(max_examples=25, deadline=None)
@given(n_in=st.integers(1, 40), n_out=st.integers(1, 5), batch=st.integers(1, 5),
       frac=st.sampled_from([0.0, 0.5, 0.9, 1.0]), block=st.sampled_from([(1, 1), (4, 1), (1, 4)]),
       bias=st.booleans(), seed=st.integers(0, 1000))
def test_sparse_linear_matches_dense(n_in, n_out, batch, frac, block, bias, seed):
    n_in, n_out = n_in * block[1], n_out * block[0]     # shapes the block tiles
    torch.manual_seed(seed)
    dense = _sparsify(nn.Linear(n_in, n_out, bias=bias), frac, seed)
    packed = CsrLinear.from_dense(dense, block)
    x = torch.randn(batch, 3, n_in)                     # extra leading dim is kept
    with torch.no_grad():
        torch.testing.assert_close(packed(x), dense(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed.to_dense().weight, dense.weight, rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(groups=st.sampled_from([1, 2, 4]), cpg=st.integers(1, 3), opg=st.sampled_from([1, 4]),
       k=st.sampled_from([1, 3, (3, 1), 5]), stride=st.sampled_from([1, 2, (2, 1)]),
       padding=st.sampled_from([0, 1, (2, 0)]), dilation=st.sampled_from([1, 2]),
       frac=st.sampled_from([0.0, 0.8, 1.0]), block=st.sampled_from([(1, 1), (4, 1)]),
       size=st.integers(9, 12), seed=st.integers(0, 1000))
def test_sparse_conv2d_matches_dense(groups, cpg, opg, k, stride, padding, dilation, frac, block,
                                     size, seed):
    if opg % block[0]:
        block = (1, 1)
    torch.manual_seed(seed)
    dense = _sparsify(nn.Conv2d(groups * cpg, groups * opg, k, stride, padding, dilation, groups),
                      frac, seed)
    packed = CsrConv2d.from_dense(dense, block)
    x = torch.randn(2, groups * cpg, size, size)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), dense(x), rtol=1e-5, atol=1e-5)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = _sparsify(nn.Conv2d(4, 8, 3, padding=1, groups=2), 0.8, 0)
        self.fc = _sparsify(nn.Linear(8 * 6 * 6, 5), 0.9, 1)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _packed(net):
    p = Net()
    p.load_state_dict(net.state_dict())
    p.conv = CsrConv2d.from_dense(net.conv, (4, 1))
    p.fc = CsrLinear.from_dense(net.fc)
    return p.eval()


def test_packed_model_traces_and_exports():
    net = Net().eval()
    packed = _packed(net)
    x = torch.randn(2, 4, 6, 6)
    ref = net(x)
    gm = torch.fx.symbolic_trace(packed)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert {"rwdeploy.sparse_conv2d", "rwdeploy.sparse_linear"} <= targets
    torch.testing.assert_close(gm(x), ref, rtol=1e-5, atol=1e-5)
    ep = torch.export.export(packed, (x,))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "rwdeploy.sparse_linear.default" in ops and "rwdeploy.sparse_conv2d.default" in ops
    torch.testing.assert_close(ep.module()(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["linear", "conv"])
def test_opcheck_fake_kernels(which):
    packed = _packed(Net().eval())
    if which == "linear":
        m = packed.fc
        args = (torch.randn(3, 8 * 6 * 6), m.values, m.indices, m.indptr, m.bias,
                m.out_features, m.in_features, list(m.block))
        op = torch.ops.rwdeploy.sparse_linear.default
    else:
        m = packed.conv
        args = (torch.randn(2, 4, 6, 6), m.values, m.indices, m.indptr, m.bias,
                list(m.weight_shape), list(m.block), list(m.stride), list(m.padding),
                list(m.dilation), m.groups)
        op = torch.ops.rwdeploy.sparse_conv2d.default
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
