"""pack_sparse times a 1x1 conv and the depthwise conv it feeds as the artifact runs them: fused
when the 1x1 conv is CSR. Which pairs are found, the joint choice against hand-made timings, and
with real measurements that the chosen pair is what the artifact builds."""
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from rwdeploy.passes.pack_sparse import LayerPacking, _choose, _choose_pair, _cost, pack_sparse
from rwdeploy.sparse.timing import HostLayerTimer


def _sparsify(model: nn.Module, frac: float, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight[torch.rand(m.weight.shape, generator=g) < frac] = 0
            if isinstance(m, nn.BatchNorm2d):   # not the identity: the fused epilogue must apply it
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
    return model.eval()


class Inverted(nn.Module):
    """MobileNetV2's expansion: 1x1 -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> 1x1."""

    def __init__(self, cin: int = 8, wide: int = 48, between: nn.Module | None = None):
        super().__init__()
        self.pw = nn.Conv2d(cin, wide, 1, bias=False)
        self.bn = nn.BatchNorm2d(wide)
        self.act = between if between is not None else nn.ReLU6()
        self.dw = nn.Conv2d(wide, wide, 3, 1, 1, groups=wide, bias=False)
        self.bn2 = nn.BatchNorm2d(wide)
        self.project = nn.Conv2d(wide, cin, 1, bias=False)

    def forward(self, x):
        return self.project(nn.functional.relu6(self.bn2(self.dw(self.act(self.bn(self.pw(x)))))))


class Shared(Inverted):
    """The 1x1 output is read twice: the artifact cannot keep it inside the depthwise kernel."""

    def forward(self, x):
        y = self.bn(self.pw(x))
        return self.project(self.dw(y)) + y.mean()


X = torch.randn(1, 8, 14, 14)


class PairTimer:
    """Fixed timings; records the pairs it is asked to time fused."""

    times_fused_pairs = True

    def __init__(self, alone: dict[str, float], fused: dict[str, float]):
        self.alone, self.fused, self.pairs = alone, fused, None

    def __call__(self, layers, pairs=()):
        self.pairs = list(pairs)
        out = {name: {alt: {"median_ms": self.alone.get(alt, 5.0)} for alt in ["dense", *formats]}
               for name, _, _, formats in layers}
        for pair in pairs:
            out[pair] = {combo: {"median_ms": ms} for combo, ms in self.fused.items()}
        return out


def _gm(model):
    return torch.fx.symbolic_trace(model)


def test_pairs_found_through_batch_norm_and_activation_only():
    timer = PairTimer({}, {})
    pack_sparse(_gm(_sparsify(Inverted(), 0.9)), X, timer=timer)
    assert timer.pairs == [("pw", "dw")]
    pack_sparse(_gm(_sparsify(Inverted(between=nn.Sigmoid()), 0.9)), X, timer=timer)
    assert timer.pairs == []            # no kernel epilogue for a sigmoid: not fused, not paired
    pack_sparse(_gm(_sparsify(Shared(), 0.9)), X, timer=timer)
    assert timer.pairs == []


def test_pairs_found_in_an_aten_graph():
    """A loaded .pt2: batch norm is `_native_batch_norm_legit_no_training` and a getitem."""
    model = _sparsify(Inverted(), 0.9)
    ep_module = torch.export.export(model, (X,)).module()
    timer = PairTimer({}, {})
    pack_sparse(torch.fx.GraphModule(ep_module, ep_module.graph), X, timer=timer)
    assert len(timer.pairs) == 1 and timer.pairs[0][0] != timer.pairs[0][1]


def test_fused_pair_wins_over_faster_alone_formats():
    """The MobileNetV2 case: bsr4x1 is faster alone, CSR fused is faster for the pair."""
    model = _sparsify(Inverted(), 0.9)
    timer = PairTimer({"dense": 1.0, "csr": 0.30, "bsr4x1": 0.25, "bsr8x1": 0.4}, {"csr+csr": 0.3, "csr+dense": 0.45})
    res = pack_sparse(_gm(model), X, timer=timer)
    pw, dw = res.record.layers[:2]
    assert (pw.chosen, dw.chosen, pw.fused_with, dw.fused_with) == ("csr", "csr", "dw", "pw")
    assert pw.fused_ms == {"csr+csr": 0.3, "csr+dense": 0.45} and "0.55" in pw.reason   # 0.25 + 0.30 alone
    torch.testing.assert_close(res.gm(X), model(X), rtol=1e-5, atol=1e-5)
    # the pair alone as fast as fused (within noise): each layer keeps its own choice
    timer.fused = {"csr+csr": 0.54}
    res = pack_sparse(_gm(model), X, timer=timer)
    assert [l.chosen for l in res.record.layers[:2]] == ["bsr4x1", "csr"] and res.record.layers[0].fused_with is None


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["csr", "bsr4x1", "bsr8x1"]), st.floats(0.001, 10), min_size=1),
       st.dictionaries(st.sampled_from(["csr"]), st.floats(0.001, 10)),
       st.floats(0.001, 10), st.floats(0.001, 10),
       st.dictionaries(st.sampled_from(["csr+csr", "csr+dense"]), st.floats(0.001, 10), min_size=1),
       st.floats(0, 0.2))
def test_pair_choice_never_takes_a_slower_combination(pw_sparse, dw_sparse, pw_dense, dw_dense, fused, noise):
    """Every combination's cost: its fused time where it fuses, else the two layers' times
    summed. The layers' own choices stay unless the cheapest fused combination beats them by
    more than the noise; they are marked fused exactly when the artifact fuses them."""
    pw_times = {"dense": {"median_ms": pw_dense}, **{k: {"median_ms": v} for k, v in pw_sparse.items()}}
    dw_times = {"dense": {"median_ms": dw_dense}, **{k: {"median_ms": v} for k, v in dw_sparse.items()}}
    entries = []
    for name, times in (("pw", pw_times), ("dw", dw_times)):
        chosen, reason = _choose(times, noise)
        entries.append(LayerPacking(name, "conv2d", [1], 0.9, chosen, reason, 4, 4))
    pw, dw = entries
    was = f"{pw.chosen}+{dw.chosen}"
    own = fused[was] if was in fused else pw_times[pw.chosen]["median_ms"] + dw_times[dw.chosen]["median_ms"]
    _choose_pair(pw, dw, pw_times, dw_times, {k: {"median_ms": v} for k, v in fused.items()}, noise)
    now = f"{pw.chosen}+{dw.chosen}"
    if now != was:
        assert fused[now] == min(fused.values()) < own * (1 - noise)
    else:
        assert min(fused.values()) >= own * (1 - noise)
    assert (pw.fused_with, dw.fused_with) == (("dw", "pw") if now in fused else (None, None))


def test_real_measurements_choose_what_the_artifact_builds(tmp_path):
    """HostLayerTimer times the pair fused; the packed model matches the original, and its TVM
    build holds the fused kernel exactly when the pair was packed in formats that fuse."""
    from rwdeploy.runtime import tvm_build

    model = _sparsify(Inverted(cin=16, wide=96), 0.9)
    x = torch.randn(1, 16, 28, 28)
    res = pack_sparse(_gm(model), x, timer=HostLayerTimer(threads=1))
    pw, dw = res.record.layers[:2]
    assert set(pw.fused_ms) == {"csr+csr", "csr+dense"}
    # the rule of test_pair_choice_never_takes_a_slower_combination, on the recorded timings
    noise = res.record.noise
    own = [_choose({k: {"median_ms": v} for k, v in l.measured_ms.items()}, noise)[0] for l in (pw, dw)]
    was, now = "+".join(own), f"{pw.chosen}+{dw.chosen}"
    own_ms = pw.fused_ms[was] if was in pw.fused_ms else pw.measured_ms[own[0]] + dw.measured_ms[own[1]]
    if now != was:
        assert pw.fused_ms[now] == min(pw.fused_ms.values()) < own_ms * (1 - noise)
    else:
        assert min(pw.fused_ms.values()) >= own_ms * (1 - noise)
    assert (pw.fused_with == "dw") == (now in pw.fused_ms)
    torch.testing.assert_close(res.gm(x), model(x), rtol=1e-4, atol=1e-4)
    art = tvm_build.build(res.gm, x, "cpu", out_dir=tmp_path, threads=1)
    fused_kernels = {n for n in tvm_build.kernel_names(art.path) if n.startswith("rw_conv2d_pwdw_")}
    assert bool(fused_kernels) == (pw.chosen == "csr" and dw.chosen in ("csr", "dense"))
