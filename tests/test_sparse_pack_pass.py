"""pack_sparse: format choice from measurements, forced modes, never mutating the input."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from rwdeploy.errors import OptionError
from rwdeploy.passes.pack_sparse import _choose, pack_sparse
from rwdeploy.sparse import CsrConv2d, CsrLinear
from rwdeploy.sparse.timing import HostLayerTimer


def _sparsify(layer, frac, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight[torch.rand(layer.weight.shape, generator=g) < frac] = 0
    return layer


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = _sparsify(nn.Conv2d(3, 8, 3, padding=1), 0.9, 0)
        self.fc = _sparsify(nn.Linear(8 * 6 * 6, 16), 0.95, 1)
        self.head = nn.Linear(16, 4)                     # dense: never a candidate

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


def _gm():
    return torch.fx.symbolic_trace(Small().eval())


X = torch.randn(1, 3, 6, 6)


def fake_timer(times):
    """A timer returning fixed medians per alternative (the pass must follow them)."""
    def timer(layers):
        out = {}
        for name, _, _, formats in layers:
            alts = ["dense", "ref:dense_torch", *formats]
            out[name] = {a: {"median_ms": times.get(a, 10.0)} for a in alts}
        return out
    return timer


def test_auto_follows_measurements_and_keeps_input():
    gm = _gm()
    before = copy.deepcopy(gm.state_dict())
    res = pack_sparse(gm, X, timer=fake_timer({"dense": 2.0, "ref:dense_torch": 0.1, "csr": 0.5}))
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    assert isinstance(gm.conv, nn.Conv2d) and isinstance(gm.fc, nn.Linear)     # input untouched
    assert isinstance(res.gm.conv, CsrConv2d) and isinstance(res.gm.fc, CsrLinear)
    assert isinstance(res.gm.head, nn.Linear)
    rec = res.record.to_dict()
    assert [l["chosen"] for l in rec["layers"]] == ["csr", "csr", "dense"]
    assert "below min_sparsity" in rec["layers"][2]["reason"]
    assert rec["bytes_saved"] > 0
    assert rec["layers"][0]["reference_ms"] == {"dense_torch": 0.1}       # recorded, not decisive
    assert "ref:dense_torch" not in rec["layers"][0]["measured_ms"]
    torch.testing.assert_close(res.gm(X), gm(X), rtol=1e-5, atol=1e-5)


def test_auto_keeps_dense_when_sparse_is_slower_or_within_noise():
    res = pack_sparse(_gm(), X, timer=fake_timer({"dense": 1.0, "csr": 1.2}))
    assert [l.chosen for l in res.record.layers] == ["dense"] * 3
    res = pack_sparse(_gm(), X, timer=fake_timer({"dense": 1.0, "csr": 0.97}), noise=0.05)
    assert [l.chosen for l in res.record.layers] == ["dense"] * 3
    assert "within noise" in res.record.layers[0].reason


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["csr", "bsr1x4", "bsr4x1", "bsr8x1"]),
                       st.floats(0.001, 100), min_size=1),
       st.floats(0.001, 100), st.floats(0.001, 100), st.floats(0, 0.2))
def test_selector_never_picks_a_slower_format(sparse_times, dense, reference, noise):
    measured = {"dense": {"median_ms": dense}, "ref:dense_torch": {"median_ms": reference},
                **{k: {"median_ms": v} for k, v in sparse_times.items()}}
    chosen, _ = _choose(measured, noise)
    best_dense, best_sparse = dense, min(sparse_times.values())
    if chosen == "dense":          # kept dense only when no packed format is clearly faster
        assert best_sparse >= best_dense * (1 - noise)
    else:                          # the fastest alternative of all, faster than every dense one
        assert measured[chosen]["median_ms"] == best_sparse < best_dense * (1 - noise)


def test_auto_with_real_measurements_is_consistent():
    gm = _gm()
    res = pack_sparse(gm, X, timer=HostLayerTimer())   # compile's timer: TVM kernels + torch here
    for layer in res.record.layers[:2]:
        med = layer.measured_ms
        assert {"dense", "csr"} <= set(med) and "dense_torch" in layer.reference_ms
        assert med[layer.chosen] == min(med.values()) or (
            layer.chosen == "dense" and min(med.values()) >= med["dense"] * (1 - res.record.noise))
    assert res.record.measured_on.startswith("host")
    torch.testing.assert_close(res.gm(X), gm(X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["csr", "bsr"])
def test_forced_modes(mode):
    gm = _gm()
    res = pack_sparse(gm, X, mode=mode)
    chosen = [l.chosen for l in res.record.layers]
    assert chosen[2] == "dense"
    assert all(c.startswith(mode) for c in chosen[:2])
    assert res.record.measured_on is None
    torch.testing.assert_close(res.gm(X), gm(X), rtol=1e-5, atol=1e-5)


def test_auto_chooses_only_with_a_measurer_it_is_given():
    with pytest.raises(ValueError, match="measurer"):
        pack_sparse(_gm(), X)             # the pass never measures by itself
    res = pack_sparse(_gm(), X, timer=fake_timer({"dense": 2.0, "csr": 0.5}))
    assert res.record.measured_on == "caller-supplied timer"


def test_off_and_bad_mode():
    res = pack_sparse(_gm(), X, mode="off")
    assert res.record.layers == [] and isinstance(res.gm.fc, nn.Linear)
    with pytest.raises(OptionError, match="--sparse 'fast'"):
        pack_sparse(_gm(), X, mode="fast")


def test_functional_graph_is_packed_like_the_module_graph():
    """An ATen graph (a loaded .pt2) packs the same layers; tests/test_sparse_pt2_parity.py
    compares the arrays."""
    model = Small().eval()
    ep_module = torch.export.export(model, (X,)).module()
    gm = torch.fx.GraphModule(ep_module, ep_module.graph)
    res = pack_sparse(gm, X, mode="csr")
    assert [(l.name, l.chosen, l.form) for l in res.record.layers] == [
        ("conv", "csr", "call"), ("fc", "csr", "call"), ("head", "dense", "call")]
    assert isinstance(res.gm.conv, CsrConv2d) and isinstance(res.gm.fc, CsrLinear) and not res.record.notes
    torch.testing.assert_close(res.gm(X), model(X), rtol=1e-5, atol=1e-5)
