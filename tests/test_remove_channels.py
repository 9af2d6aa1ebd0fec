"""remove_zero_channels: exact, smaller, honest records; verify_equivalence finds divergence."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import fx, nn

import nets
import nets_families
from channel_helpers import conv_linear_macs, randomize_norms, zero_filters
from rwdeploy import models
from rwdeploy.errors import OptionError
from rwdeploy.passes.channel_groups import analyze_channel_groups
from rwdeploy.passes.remove_zero_channels import remove_zero_channels
from rwdeploy.passes.trace import trace_model
from rwdeploy.passes.verify import first_diverging_node, verify_equivalence

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RTOL = 1e-4


def zoo_case(name):
    shape = models.input_shape(name)
    if shape[-1] > 64:  # ImageNet models at 64x64 keep the test fast; the graph is the same
        shape = shape[:-2] + (64, 64)
    return (lambda: models.create(name)), shape


CASES = {f"zoo:{n}": zoo_case(n) for n in models.list()}
CASES.update({f"net:{n}": v for n, v in nets.TEST_NETS.items()})
CASES.update({f"family:{n}": v for n, v in nets_families.TEST_NETS.items()})


def pruned(ctor, shape, seed=0):
    """A traced model with ~half the channels of each removable group zeroed in the producing
    conv/linear weights only; norms and biases random, so removed channels carry constants."""
    torch.manual_seed(seed)
    model = ctor().eval()
    randomize_norms(model, seed)
    x = torch.randn(shape)
    gm = trace_model(model, x).gm
    analysis = analyze_channel_groups(gm, x)
    assert zero_filters(gm, analysis, 0.5, seed) > 0
    return gm, x, analysis


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_and_smaller(case):
    ctor, shape = CASES[case]
    gm, x, analysis = pruned(ctor, shape)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    res = remove_zero_channels(gm, x, analysis=analysis)
    probes = [x, torch.randn((2,) + tuple(shape[1:]))]
    v = verify_equivalence(gm, res.gm, probes, rtol=RTOL, record=res.record)
    assert v.passed, f"max_rel={v.max_rel} first diverging node {v.first_diverging_node}"
    assert v.max_rel <= RTOL
    assert first_diverging_node(gm, res.gm, (x,), record=res.record) is None  # no false alarms
    assert res.record.params_after < res.record.params_before
    assert sum(p.numel() for p in res.gm.parameters()) == res.record.params_after
    assert conv_linear_macs(res.gm, x) < conv_linear_macs(gm, x)
    # the input GraphModule is left as it was
    assert all(torch.equal(before[k], t) for k, t in gm.state_dict().items())
    json.dumps(res.record.to_dict())


def test_constants_of_removed_channels_are_folded_where_needed():
    gm, x, _ = pruned(*nets.TEST_NETS["chain"])
    res = remove_zero_channels(gm, x)
    folded = {layer.name: layer.folded for layer in res.record.layers}
    # b and c are padded 3x3 convs: a removed channel's constant contributes less at borders
    assert folded["b.0"] == "border kernel" and folded["c.0"] == "border kernel"
    assert folded["head"] == "bias"  # a Linear after global pooling: position-independent
    assert all(layer.folded_max_abs > 0 for layer in res.record.layers if layer.folded)
    # without the folded constants the slim model would be wrong: drop them and compare
    broken = remove_zero_channels(gm, x).gm
    for name, buf in list(broken.named_buffers()):
        if name.startswith("_rw_const_"):
            buf.zero_()
    assert not verify_equivalence(gm, broken, [x]).passed


def test_record_lists_shapes_removed_and_pinned_groups():
    gm, x, _ = pruned(*nets.TEST_NETS["unknown_op"])
    rec = remove_zero_channels(gm, x).record.to_dict()
    layers = {layer["name"]: layer for layer in rec["layers"]}
    assert layers["a.0"]["before"]["weight"] == [8, 3, 3, 3]
    assert layers["a.0"]["after"]["weight"][0] == 4
    assert any("atan" in reason for g in rec["pinned_groups"] for reason in g["reasons"])
    assert all(g["removed"] > 0 and g["why"] for g in rec["removed_groups"])


def traced_chain(net: type[nn.Module] = nets.Chain):
    """(model with random norms, input, its trace) of a test net taking [1, 3, 16, 16]."""
    torch.manual_seed(0)
    model = net().eval()
    randomize_norms(model)
    x = torch.randn(1, 3, 16, 16)
    return model, x, trace_model(model, x).gm


def test_masks_name_channels_to_remove():
    model, x, gm = traced_chain()
    mask = torch.ones_like(gm.get_parameter("b.0.weight"), dtype=torch.bool)
    mask[[1, 4, 7]] = False
    res = remove_zero_channels(gm, x, masks={"b.0.weight": mask})
    assert res.gm.get_submodule("b.0").out_channels == 9
    reference = trace_model(copy.deepcopy(model), x).gm  # traced modules share parameters
    with torch.no_grad():
        reference.get_parameter("b.0.weight").mul_(mask)
    assert verify_equivalence(reference, res.gm, [x, torch.randn(2, 3, 16, 16)]).passed
    assert gm.get_parameter("b.0.weight")[1].abs().sum() > 0  # the input model is untouched
    with pytest.raises(OptionError, match="nope.weight"):
        remove_zero_channels(gm, x, masks={"nope.weight": mask})


def test_channels_nobody_reads_are_removed():
    _, x, gm = traced_chain()
    with torch.no_grad():
        gm.get_parameter("c.0.weight")[:, [0, 3, 5]] = 0  # channel scheme: zero input columns
    res = remove_zero_channels(gm, x)
    assert res.gm.get_submodule("b.0").out_channels == 9
    assert verify_equivalence(gm, res.gm, [x, torch.randn(2, 3, 16, 16)]).passed


def _zero_rows(gm: fx.GraphModule, key: str, rows: list[int]) -> None:
    with torch.no_grad():
        gm.get_parameter(key)[rows] = 0


def test_a_channel_whose_depthwise_filter_is_zero_goes_when_its_input_is_read_by_nothing_else():
    _, x, gm = traced_chain(nets.GroupedDepthwise)
    _zero_rows(gm, "dw.0.weight", [1, 5, 9, 13])  # the depthwise filters only: one per group of `grouped`
    # with their BN shifts, so that the removed channels carry zero: a constant through the padded
    # dw2 would need a dense map larger than what four filters save, and then they stay (see
    # test_constant_maps_never_make_the_slim_model_store_more)
    with torch.no_grad():
        gm.get_parameter("dw.1.bias")[[1, 5, 9, 13]] = 0
        gm.get_buffer("dw.1.running_mean")[[1, 5, 9, 13]] = 0
    res = remove_zero_channels(gm, x)
    # the grouped conv's outputs feeding them went too, and dw2's two outputs of each
    assert res.gm.get_submodule("grouped.0").out_channels == 12 and res.gm.get_submodule("dw.0").groups == 12
    assert res.gm.get_submodule("dw2").out_channels == 24
    assert {g["why"][0] for g in res.record.removed_groups} == {"zero depthwise rows"}
    assert verify_equivalence(gm, res.gm, [x, torch.randn(2, 3, 16, 16)], record=res.record).passed


def test_a_channel_whose_depthwise_filter_is_zero_stays_when_its_input_is_read_elsewhere():
    _, x, gm = traced_chain(nets.Ghost)
    _zero_rows(gm, "cheap.0.weight", [0, 2])  # ghost features: the input is concatenated too
    assert remove_zero_channels(gm, x).record.params_after == sum(p.numel() for p in gm.parameters())
    _zero_rows(gm, "primary.0.weight", [0, 2])  # now the input is a constant as well
    res = remove_zero_channels(gm, x)
    assert res.gm.get_submodule("primary.0").out_channels == 6 and res.gm.get_submodule("cheap.0").groups == 6
    assert verify_equivalence(gm, res.gm, [x, torch.randn(2, 3, 16, 16)], record=res.record).passed


def test_weights_computed_from_parameters_are_folded_and_their_filters_removed():
    gm, x, analysis = pruned(*nets_families.TEST_NETS["nfnet"])
    convs = ("stem", "a", "b", "c")
    assert sorted(analysis.folded_weights.values()) == sorted(f"{c}.weight" for c in convs)
    res = remove_zero_channels(gm, x, analysis=analysis)
    slim_keys = set(res.gm.state_dict())
    assert all(f"{c}.weight" in slim_keys and f"{c}.gain" not in slim_keys for c in convs)
    assert res.gm.get_parameter("a.weight").shape[0] < gm.get_parameter("a.weight").shape[0]
    assert verify_equivalence(gm, res.gm, [x, torch.randn(2, 3, 16, 16)], record=res.record).passed
    # the gains folded in: the slim model has fewer parameters than the weights alone would give
    assert res.record.params_before == sum(p.numel() for p in gm.parameters())


def test_verify_names_the_first_diverging_node():
    gm, x, _ = pruned(*nets.TEST_NETS["concat"])
    res = remove_zero_channels(gm, x)
    with torch.no_grad():
        res.gm.get_submodule("b2.0").weight.add_(0.5)
    v = verify_equivalence(gm, res.gm, [x], record=res.record)
    assert not v.passed and v.max_rel > 1e-2
    assert v.first_diverging_node == "b2_0"


class ShapeDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nets.cbr(3, 8), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        if y.shape[-1] > 4:  # symbolic tracing cannot branch on a size; torch.export can
            y = y * 2
        return self.b(y)


def test_untraceable_model_falls_back_to_torch_export_and_is_slimmed():
    torch.manual_seed(0)
    model = ShapeDependent().eval()
    randomize_norms(model)
    with torch.no_grad():
        model.a[0].weight[[1, 2, 5]] = 0
    x = torch.randn(1, 3, 8, 8)
    tr = trace_model(model, x)
    assert tr.method == "torch.export" and tr.fallback_reason
    assert set(model.state_dict()) <= set(tr.gm.state_dict())
    res = remove_zero_channels(tr.gm, x)
    assert verify_equivalence(model, res.gm, [x, torch.randn(1, 3, 8, 8)]).passed  # export fixes the batch
    assert res.gm.get_parameter("b.weight").shape == (4, 5, 3, 3)


def test_torch_export_fallback_keeps_the_batch_dynamic():
    """The fallback trace of an untraceable model runs at other batch sizes (a `.pt2` saved with
    a dynamic batch and loaded with its batch-2 example must not come out fixed at batch 2)."""
    torch.manual_seed(0)
    model = ShapeDependent().eval()
    randomize_norms(model)
    for example_batch in (1, 2):
        tr = trace_model(model, torch.randn(example_batch, 3, 8, 8))
        assert tr.method == "torch.export"
        for batch in (1, 3):
            x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                torch.testing.assert_close(tr.gm(x), model(x), rtol=1e-5, atol=1e-6)


class FixedBatchBranch(ShapeDependent):
    def forward(self, x):
        return super().forward(x).view(1, -1)  # fixes the batch size to 1


def test_torch_export_fallback_of_a_fixed_batch_model_stays_static():
    model = FixedBatchBranch().eval()
    x = torch.randn(1, 3, 8, 8)
    tr = trace_model(model, x)
    assert tr.method == "torch.export"
    with torch.no_grad():
        torch.testing.assert_close(tr.gm(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["zoo:resnet20", "net:grouped_depthwise", "net:attention", "net:split_chunk", "net:norms",
                                  "net:instance_norm", "net:adaptive_max_pool", "net:gathers_and_windows", "net:patches_as_columns", "net:patches_of_the_input",
                                  "net:outlook_and_max", "net:einsum_attention", "net:slice_write",
                                  "net:shared_conv", "family:shufflenet_v2", "family:mobilenet_v3", "family:res2net",
                                  "family:swin", "family:deit", "family:convnext_v2", "family:resmlp", "family:xcit",
                                  "family:levit", "family:mobilevit", "family:nfnet", "family:pit", "family:eca"])
def test_exported_programs_are_slimmed_exactly(case):
    """A .pt2 program's graph holds aten ops with parameters read through get_attr."""
    gm, x, _ = pruned(*CASES[case])
    program = torch.export.export(gm, (x,)).module()
    aten = fx.GraphModule(program, program.graph)
    assert not any(n.op == "call_module" and isinstance(aten.get_submodule(n.target), nn.Conv2d)
                   for n in aten.graph.nodes)
    res = remove_zero_channels(aten, x)
    assert verify_equivalence(gm, res.gm, [x, torch.randn(x.shape)], record=res.record).passed
    assert res.record.params_after < res.record.params_before
    assert not any("GuardsFn" in g["reasons"][0] for g in res.record.pinned_groups)


class _TransposedAfterShift(nn.Module):
    """A removed channel's BN shift reaches a transposed conv: its constant folds only as a
    dense C_out x H x W map, which at a large input outweighs the weights removal saves."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)

    def forward(self, x):
        return self.up(self.a(x))


def _stored(gm: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in gm.state_dict().values())


@pytest.mark.parametrize("side,kept", [(32, True), (2, False)])
def test_constant_maps_never_make_the_slim_model_store_more(side, kept):
    torch.manual_seed(0)
    net = _TransposedAfterShift().eval()
    with torch.no_grad():
        net.a[0].weight[:2] = 0
        net.a[0].bias[:2] = 0
        net.a[1].bias.copy_(torch.tensor([0.5, -0.3, 0.1, 0.2]))  # zero filters still carry relu(shift)
    x = torch.randn(1, 3, side, side)
    gm = trace_model(net, x).gm
    res = remove_zero_channels(gm, x)
    assert verify_equivalence(gm, res.gm, [x, torch.randn(x.shape)], record=res.record).passed
    assert _stored(res.gm) <= _stored(gm)
    if kept:  # a 2x64x64 map outweighs two filters: they stay, and the record says why
        assert res.record.kept_for_size > 0 and res.record.params_after == res.record.params_before
    else:  # a 2x4x4 map is cheaper than the two filters: they go
        assert res.record.kept_for_size == 0 and res.record.params_after < res.record.params_before
