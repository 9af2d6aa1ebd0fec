"""Op specs and the pass protocol: one registry, layer views that hide a layer's form (module,
torch function, ATen op), strict analysis, passes composed by a checked sequence."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import nets
from channel_helpers import randomize_norms, zero_filters
from rwdeploy.errors import VerificationError
from rwdeploy.passes import channel_groups
from rwdeploy.passes.channel_groups import analyze_channel_groups
from rwdeploy.passes.ops import SPECS, layer_view
from rwdeploy.passes.ops.spec import Match, OpSpec, register
from rwdeploy.passes.pack_sparse import PackSparse
from rwdeploy.passes.protocol import PassContext, PassResult, Sequence
from rwdeploy.passes.remove_zero_channels import RemoveZeroChannels
from rwdeploy.passes.trace import trace_model
from rwdeploy.sparse import CsrConv2d

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_form_is_claimed_by_one_spec_only():
    with pytest.raises(ValueError, match="'unary' and 'my_relu'"):
        register(OpSpec("my_relu", Match(functions=(torch.atan, F.relu)), SPECS["unary"].rule))
    assert "my_relu" not in SPECS  # nothing of a refused spec is registered
    gm = fx.symbolic_trace(nets.UnknownOp())
    x = torch.randn(1, 3, 8, 8)
    assert any("atan" in r for g in analyze_channel_groups(gm, x).groups for r in g.pinned)


class Layers(nn.Module):
    """One of each weight-bearing op family, to compare a module graph with its ATen graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn, self.act = nn.BatchNorm2d(8), nn.PReLU(8)
        self.dw = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8)
        self.gn, self.inorm = nn.GroupNorm(4, 16), nn.InstanceNorm2d(16, affine=True)
        self.up = nn.ConvTranspose2d(16, 6, 2, stride=2)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        x = self.up(self.inorm(self.gn(self.dw(x))))
        return self.fc(x.mean((2, 3)))


def _views(gm: fx.GraphModule) -> dict[str, object]:
    found = {}
    for node in gm.graph.nodes:
        view = layer_view(gm, node)
        if view is not None:
            found[view.tensors["weight"]] = view
    return found


def _graphs(model: nn.Module, x: torch.Tensor) -> tuple[fx.GraphModule, fx.GraphModule]:
    """The model's symbolic trace (module calls) and its torch.export graph (ATen calls)."""
    traced = trace_model(model, x).gm
    program = torch.export.export(traced, (x,)).module()
    aten = fx.GraphModule(program, program.graph)
    assert not any(n.op == "call_module" and type(aten.get_submodule(n.target)).__name__ != "GuardsFn"
                   for n in aten.graph.nodes)
    return copy.deepcopy(traced), aten


def test_layer_views_read_module_and_aten_forms_alike():
    torch.manual_seed(0)
    model = Layers().eval()
    randomize_norms(model)
    module_views, aten_views = (_views(gm) for gm in _graphs(model, torch.randn(1, 3, 8, 8)))
    assert sorted(module_views) == sorted(aten_views) == sorted(
        f"{name}.weight" for name in ("conv", "bn", "act", "dw", "gn", "inorm", "up", "fc"))
    g = torch.Generator().manual_seed(1)
    for key, mv in module_views.items():
        av, module = aten_views[key], model.get_submodule(key.removesuffix(".weight"))
        assert type(mv) is type(av) and mv.tensors == av.tensors, key
        assert mv.form.label == type(module).__name__ and av.form.label.endswith("(functional)")
        if not mv.kernel:
            continue
        assert av.type == mv.type and av.weight_dims == mv.weight_dims
        if isinstance(module, nn.Linear):
            x = torch.randn(2, module.in_features, generator=g, dtype=torch.float64)
        else:
            assert (av.groups, av.transposed, av.in_channels, av.out_channels) == (
                module.groups, module.transposed, module.in_channels, module.out_channels)
            x = torch.randn(2, module.in_channels, 5, 5, generator=g, dtype=torch.float64)
        bias_free = copy.deepcopy(module).double()
        bias_free.bias = None
        for view in (mv, av):  # the same bias-free function of the input, whatever the form
            torch.testing.assert_close(view.consumer()(x), bias_free(x), rtol=1e-12, atol=1e-12)


def _kept(n: int, gone: list[int]) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[gone] = False
    return mask


CUTS = {  # weight key -> (kept input channels, kept output channels)
    "conv.weight": (_kept(3, [1]), _kept(8, [2, 5])),
    "bn.weight": (_kept(8, [2, 5]),) * 2,
    "act.weight": (_kept(8, [2, 5]),) * 2,
    "dw.weight": (_kept(8, [2, 5]), _kept(16, [4, 5, 10, 11])),  # channel c feeds outputs 2c, 2c+1
    "gn.weight": (_kept(16, [4, 5, 6, 7]),) * 2,  # a whole group
    "inorm.weight": (_kept(16, [3]),) * 2,
    "up.weight": (_kept(16, [3, 9]), _kept(6, [0])),
    "fc.weight": (_kept(6, [0]), _kept(5, [4])),
}


@pytest.mark.parametrize("key", sorted(CUTS))
def test_layer_views_shrink_module_and_aten_forms_alike(key):
    torch.manual_seed(0)
    model = Layers().eval()
    randomize_norms(model)
    graphs = _graphs(model, torch.randn(1, 3, 8, 8))
    views = [_views(gm)[key] for gm in graphs]
    for view in views:
        view.shrink(*CUTS[key])
    module_state, aten_state = graphs[0].state_dict(), graphs[1].state_dict()
    for tensor_key in views[0].tensors.values():
        assert torch.equal(module_state[tensor_key], aten_state[tensor_key]), tensor_key
    w, (keep_in, keep_out) = model.state_dict()[key], CUTS[key]
    if key == "up.weight":  # transposed: [in, out, k, k]
        assert torch.equal(module_state[key], w[keep_in][:, keep_out])
    elif key == "dw.weight" or not views[0].kernel:
        assert torch.equal(module_state[key], w[keep_out])
    else:
        assert torch.equal(module_state[key], w[keep_out][:, keep_in])
    if key == "gn.weight":
        assert graphs[0].gn.num_groups == 3 and views[1].setting("num_groups") == 3
    if key == "dw.weight":  # depthwise: one conv group per kept channel, in both forms
        assert graphs[0].dw.groups == views[1].setting("groups") == 6


def _broken(st, node):
    raise ValueError("a rule bug")


def test_strict_analysis_raises_rule_errors_where_normal_analysis_pins(monkeypatch):
    model = nets.Chain().eval()
    x = torch.randn(1, 3, 16, 16)
    gm = trace_model(model, x).gm
    real = channel_groups.classify
    monkeypatch.setattr(channel_groups, "classify",
                        lambda node, st: OpSpec("broken", Match(), _broken) if node.name == "b_2" else real(node, st))
    with pytest.raises(ValueError, match="a rule bug"):
        analyze_channel_groups(gm, x, strict=True)
    monkeypatch.setenv("RWDEPLOY_STRICT_ANALYSIS", "1")
    with pytest.raises(ValueError, match="a rule bug"):
        analyze_channel_groups(gm, x)  # the tests' default
    analysis = analyze_channel_groups(gm, x, strict=False)
    group = next(g for g in analysis.groups if any(s.tensor == "b.0.weight" and s.role == "producer" for s in g.slices))
    assert any("analysis failed (ValueError: a rule bug)" in r for r in group.pinned)
    assert analysis.ops["b_2"] == "opaque"


def _pruned_chain():
    torch.manual_seed(0)
    model = nets.Chain().eval()
    randomize_norms(model)
    x = torch.randn(1, 3, 16, 16)
    gm = trace_model(model, x).gm
    zero_filters(gm, analyze_channel_groups(gm, x), 0.5)
    return gm, x


class _Record:
    def to_dict(self):
        return {}


class _Perturb:
    """A broken pass: it changes a weight."""

    name = "perturb"

    def __call__(self, gm, ctx):
        new = copy.deepcopy(gm)
        with torch.no_grad():
            new.get_parameter("head.weight").add_(0.5)
        return PassResult(new, _Record())


def test_sequence_runs_passes_in_order_on_one_context_and_checks_each():
    gm, x = _pruned_chain()
    probes = [x, torch.randn(2, 3, 16, 16)]
    ctx = PassContext(x, probe_inputs=probes)
    result = Sequence([RemoveZeroChannels(), PackSparse(mode="csr", min_sparsity=0.0)], check=True)(gm, ctx)
    assert list(result.record.records) == ["remove_zero_channels", "pack_sparse"]
    removal, packing = result.record.records.values()
    assert removal.params_after < removal.params_before and packing.packed
    assert isinstance(result.gm.get_submodule(packing.packed[0].name), CsrConv2d)
    for p in probes:  # the original model's output, by an independent run
        torch.testing.assert_close(result.gm(p), gm(p), rtol=1e-4, atol=1e-5)
    assert set(result.record.to_dict()) == {"remove_zero_channels", "pack_sparse"}
    with pytest.raises(VerificationError, match="pass perturb changed the model"):
        Sequence([RemoveZeroChannels(), _Perturb()], check=True)(gm, ctx)
    Sequence([_Perturb()])(gm, ctx)  # unchecked: runs


def test_removal_reads_masks_from_the_context():
    gm, x = _pruned_chain()
    mask = torch.ones_like(gm.get_parameter("a.0.weight"), dtype=torch.bool)
    mask[[0, 1]] = False
    plain = RemoveZeroChannels()(gm, PassContext(x)).gm
    masked = RemoveZeroChannels()(gm, PassContext(x, masks={"a.0.weight": mask})).gm
    assert masked.get_submodule("a.0").out_channels < plain.get_submodule("a.0").out_channels


class ConvForms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.up, self.c = nn.ConvTranspose2d(8, 6, 2, stride=2), nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.c(F.relu(self.up(F.relu(self.b(F.relu(self.a(x)))))))


def test_core_aten_convolution_is_one_more_form_of_the_conv_spec():
    """After run_decompositions every convolution (plain, grouped, transposed) is
    aten.convolution; the conv spec's view reads it like the module."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    program = torch.export.export(ConvForms().eval(), (x,)).run_decompositions().module()
    gm = fx.GraphModule(program, program.graph)
    convs = [n for n in gm.graph.nodes if n.target is torch.ops.aten.convolution.default]
    assert len(convs) == 4 and [layer_view(gm, n).transposed for n in convs] == [False, False, True, False]
    analysis = analyze_channel_groups(gm, x)
    assert sum(g.removable for g in analysis.groups) == 3
    assert zero_filters(gm, analysis, 0.5) > 0
    res = RemoveZeroChannels(analysis)(gm, PassContext(x))
    assert res.record.params_after < res.record.params_before
    for p in (x, torch.randn(1, 3, 8, 8)):  # the original graph's output, run independently
        torch.testing.assert_close(res.gm(p), gm(p), rtol=1e-4, atol=1e-5)


def test_the_compile_timer_loads_tvm_only_when_it_measures():
    import subprocess
    import sys

    code = ("import sys; from rwdeploy.passes.pack_sparse import pack_sparse; "
            "from rwdeploy.sparse.timing import HostLayerTimer; t = HostLayerTimer('arm'); "
            "print('tvm' in sys.modules, t.where)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "None"]
