"""Channel dependency groups, hand-checked for each coupling pattern."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import nets
import nets_families
from rwdeploy import models
from rwdeploy.passes.channel_groups import ChannelGroup, analyze_channel_groups
from rwdeploy.passes.trace import trace_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def analysis_of(ctor, shape):
    torch.manual_seed(0)
    model = ctor().eval()
    x = torch.randn(shape)
    gm = trace_model(model, x).gm
    return analyze_channel_groups(gm, x)


def group_with(analysis, tensor: str, role: str, dim: int | None = None) -> ChannelGroup:
    found = [g for g in analysis.groups
             if any(s.tensor == tensor and s.role == role and (dim is None or s.dim == dim) for s in g.slices)]
    assert len(found) == 1, f"{tensor} ({role}) in {len(found)} groups"
    return found[0]


def slice_of(group: ChannelGroup, tensor: str, role: str):
    (s,) = [s for s in group.slices if s.tensor == tensor and s.role == role]
    return s


def test_chain_conv_bn_next_conv():
    a = analysis_of(*nets.TEST_NETS["chain"])
    g = group_with(a, "a.0.weight", "producer")
    assert g.size == 8 and g.unit == 1 and g.removable
    assert slice_of(g, "a.0.weight", "producer").indices == [[c] for c in range(8)]
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert slice_of(g, f"a.1.{name}", "follower").dim == 0
    consumer = slice_of(g, "b.0.weight", "consumer")
    assert consumer.dim == 1 and consumer.indices == [[c] for c in range(8)]


def test_residual_couples_every_producer_of_the_sum():
    model = models.create("resnet20")
    x = torch.randn(1, 3, 32, 32)
    a = analyze_channel_groups(trace_model(model, x).gm, x)
    g = group_with(a, "conv1.weight", "producer")
    producers = {s.tensor for s in g.slices_with("producer")}
    assert producers == {"conv1.weight", "layer1.0.conv2.weight", "layer1.1.conv2.weight", "layer1.2.conv2.weight"}
    consumers = {s.tensor for s in g.slices_with("consumer")}
    assert {"layer1.0.conv1.weight", "layer2.0.conv1.weight", "layer2.0.shortcut.0.weight"} <= consumers


def test_concat_offsets():
    a = analysis_of(*nets.TEST_NETS["concat"])
    g1 = group_with(a, "b1.0.weight", "producer")
    g2 = group_with(a, "b2.0.weight", "producer")
    assert slice_of(g1, "conv.weight", "consumer").indices == [[c] for c in range(6)]
    assert slice_of(g2, "conv.weight", "consumer").indices == [[c] for c in range(6, 16)]
    assert slice_of(g2, "bn.running_mean", "follower").indices == [[c] for c in range(6, 16)]


def test_chunk_splits_one_producer_into_two_groups():
    a = analysis_of(*nets.TEST_NETS["split_chunk"])
    groups = [g for g in a.groups if any(s.tensor == "stem.0.weight" and s.role == "producer" for s in g.slices)]
    assert sorted(g.size for g in groups) == [6, 6]
    by_consumer = {next(s.tensor for s in g.slices_with("consumer")): g for g in groups}
    assert slice_of(by_consumer["c1.0.weight"], "stem.0.weight", "producer").indices == [[c] for c in range(6)]
    assert slice_of(by_consumer["c2.0.weight"], "stem.0.weight", "producer").indices == [[c] for c in range(6, 12)]
    assert slice_of(by_consumer["c2.0.weight"], "c2.0.weight", "consumer").indices == [[c] for c in range(6)]


def test_flatten_into_linear_is_channel_times_spatial():
    a = analysis_of(*nets.TEST_NETS["flatten_linear"])
    g = group_with(a, "c2.0.weight", "producer")
    assert slice_of(g, "fc1.weight", "consumer").indices == [list(range(c * 16, c * 16 + 16)) for c in range(8)]


def test_depthwise_rows_produce_a_segment_of_their_input_channel_and_grouped_conv_reads_within_its_group():
    a = analysis_of(*nets.TEST_NETS["grouped_depthwise"])
    g = group_with(a, "grouped.0.weight", "producer")
    # the depthwise output goes with its input (one group channel) but its rows produce it
    assert slice_of(g, "dw.0.weight", "producer").indices == [[c] for c in range(16)]
    g_dw = group_with(a, "dw2.weight", "producer")
    assert g_dw is g and slice_of(g, "dw2.weight", "producer").indices == [[2 * c, 2 * c + 1] for c in range(16)]
    # segments of channel c: grouped conv output -> dw -> dw2 (multiplier 2), each fed by a link
    parts = a.segments[g.classes[3]]
    assert len(parts) == 3 and sorted(len(p.links) for p in parts) == [0, 1, 1]
    assert sorted(rows[2] for p in parts for _, rows in p.links) == [[3], [6, 7]]
    assert [p.producers[0][:3] for p in parts if not p.links] == [("grouped.0.weight", 0, [3])]
    stem = group_with(a, "stem.0.weight", "producer")
    read = slice_of(stem, "grouped.0.weight", "consumer")
    assert read.indices == [[c % 4] for c in range(16)]
    assert read.span == [((c // 4) * 4, (c // 4) * 4 + 4) for c in range(16)]


def test_channel_shuffle_interleaves_consumer_columns():
    a = analysis_of(*nets.TEST_NETS["shuffle"])
    ga, gb = group_with(a, "a.0.weight", "producer"), group_with(a, "b.0.weight", "producer")
    assert slice_of(ga, "c.0.weight", "consumer").indices == [[2 * c] for c in range(8)]
    assert slice_of(gb, "c.0.weight", "consumer").indices == [[2 * c + 1] for c in range(8)]


def test_gate_multiplication_couples_gate_producer_with_the_stream():
    a = analysis_of(*nets.TEST_NETS["multi_residual"])
    g = group_with(a, "gate.weight", "producer")
    producers = {s.tensor for s in g.slices_with("producer")}
    assert {"stem.0.weight", "b1.0.weight", "b2.0.weight", "b3.0.weight", "gate.weight"} <= producers


def test_group_norm_moves_whole_groups():
    a = analysis_of(*nets.TEST_NETS["norms"])
    g = group_with(a, "c1.weight", "producer")
    assert g.size == 4 and g.unit == 4
    assert slice_of(g, "gn.weight", "follower").indices == [list(range(4 * j, 4 * j + 4)) for j in range(4)]
    assert slice_of(g, "act.weight", "follower").dim == 0
    assert slice_of(g, "up.weight", "consumer").dim == 0  # ConvTranspose2d reads dim 0
    layer_scale = group_with(a, "scale", "follower")
    assert slice_of(layer_scale, "c2.weight", "producer").indices == [[c] for c in range(8)]


def test_attention_groups_whole_heads():
    a = analysis_of(*nets.TEST_NETS["attention"])
    g = group_with(a, "attn.q.weight", "producer")
    assert g.size == 4 and g.unit == 4 and g.removable
    for name in ("attn.q.weight", "attn.k.weight", "attn.v.weight"):
        assert slice_of(g, name, "producer").indices == [list(range(4 * h, 4 * h + 4)) for h in range(4)]
    assert slice_of(g, "attn.proj.weight", "consumer").indices == [list(range(4 * h, 4 * h + 4)) for h in range(4)]


def test_fused_qkv_heads_in_vit():
    a = analysis_of(*nets_families.TEST_NETS["vit"])
    g = group_with(a, "blocks.0.attn.qkv.weight", "producer")
    rows = slice_of(g, "blocks.0.attn.qkv.weight", "producer").indices
    assert g.size == 4 and rows[1] == [4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39]


def test_channels_last_layer_norm_pins_the_stream_but_not_the_mlp():
    a = analysis_of(*nets_families.TEST_NETS["convnext"])
    stream = group_with(a, "stage1.gamma", "follower")
    assert any("layer norm over channels" in r for r in stream.pinned)
    hidden = group_with(a, "stage1.pw1.weight", "producer", dim=0)
    assert hidden.removable and hidden.size == 32


def test_unknown_op_and_output_pin_with_reasons():
    a = analysis_of(*nets.TEST_NETS["unknown_op"])
    g = group_with(a, "b.0.weight", "producer")
    assert any("atan" in r and "not understood" in r for r in g.pinned)
    assert group_with(a, "a.0.weight", "producer").removable
    out = group_with(a, "out.weight", "producer")
    assert out.pinned == ["model output"]


def test_analysis_is_json_data():
    a = analysis_of(*nets.TEST_NETS["split_chunk"])
    d = json.loads(json.dumps(a.to_dict()))
    assert d["removable_groups"] + d["pinned_groups"] == len(a.groups)
    assert {"id", "size", "unit", "pinned", "slices"} <= set(d["groups"][0])


@pytest.mark.parametrize("name", sorted(nets_families.TEST_NETS))
def test_every_family_has_removable_groups(name):
    a = analysis_of(*nets_families.TEST_NETS[name])
    assert any(g.removable and g.slices_with("producer") for g in a.groups)


def test_swin_relative_position_bias_table_follows_its_heads():
    a = analysis_of(*nets_families.TEST_NETS["swin"])
    g = group_with(a, "blocks.0.attn.qkv.weight", "producer")
    assert g.removable and g.size == 4 and g.unit == 4
    table = slice_of(g, "blocks.0.table", "follower")
    assert table.dim == 1 and table.indices == [[h] for h in range(4)]


def test_torch_multihead_attention_is_pinned_with_its_name():
    a = analysis_of(*nets.TEST_NETS["torch_mha"])
    stream = group_with(a, "embed.weight", "producer")
    assert any("MultiheadAttention" in r and "not understood" in r for r in stream.pinned)
    assert group_with(a, "mlp.0.weight", "producer").removable


@pytest.mark.parametrize("form", ["module", "export"])
def test_a_layer_called_twice_reads_one_channel_at_each_index(form):
    ctor, shape = nets.TEST_NETS["shared_conv"]
    if form == "module":
        a = analysis_of(ctor, shape)
    else:  # the export holds one weight read by two aten.conv2d calls
        torch.manual_seed(0)
        x = torch.randn(shape)
        a = analyze_channel_groups(torch.export.export(ctor().eval(), (x,)).module(), x)
    groups = [g for g in a.groups if any(s.tensor == "shared.weight" for s in g.slices)]
    # the first call's input and output and the second call's output: joined index by index
    assert len(groups) == 1 and groups[0].removable and groups[0].size == 8
    assert {s.tensor for s in groups[0].slices_with("producer")} == {"a.0.weight", "shared.weight"}


def test_affine_instance_norm_follows_its_channels_in_every_form():
    a = analysis_of(*nets.TEST_NETS["instance_norm"])
    for producer, norm, n in (("a.weight", "in1", 8), ("b.weight", "in2", 8)):  # modules
        g = group_with(a, producer, "producer")
        assert g.removable and g.size == n
        tensors = ("weight", "bias") + (("running_mean", "running_var") if norm == "in2" else ())
        for name in tensors:
            assert slice_of(g, f"{norm}.{name}", "follower").indices == [[c] for c in range(n)]
    g = group_with(a, "c.weight", "producer")  # F.instance_norm(x, weight=gamma, bias=beta)
    assert g.removable and slice_of(g, "gamma", "follower").indices == [[c] for c in range(6)]


def test_exported_adaptive_max_pool_passes_channels_through():
    """aten.adaptive_max_pool2d returns (values, indices): both keep the input's channels."""
    torch.manual_seed(0)
    ctor, shape = nets.TEST_NETS["adaptive_max_pool"]
    x = torch.randn(shape)
    program = torch.export.export(ctor().eval(), (x,)).module()
    gm = torch.fx.GraphModule(program, program.graph)
    assert any(getattr(n.target, "__name__", "") == "adaptive_max_pool2d.default" for n in gm.graph.nodes)
    a = analyze_channel_groups(gm, x)
    for producer, consumer in (("a.0.weight", "b.0.weight"), ("b.0.weight", "out.weight")):
        g = group_with(a, producer, "producer")
        assert g.removable and slice_of(g, consumer, "consumer").indices == [[c] for c in range(8)]


SUITE_PATTERNS = ["deit", "convnext_v2", "resmlp", "xcit", "levit", "mobilevit", "nfnet", "pit", "eca"]


@pytest.mark.parametrize("form", ["module", "export"])
@pytest.mark.parametrize("name", SUITE_PATTERNS)
def test_the_patterns_of_the_conformance_suite_are_understood(name, form):
    """Every op of these mirrors (fused attention, GRN, addcmul, normalize, reshape_as,
    expand_as, weight standardisation, ...) has a spec, as a module graph and as ATen."""
    ctor, shape = nets_families.TEST_NETS[name]
    torch.manual_seed(0)
    model, x = ctor().eval(), torch.randn(shape)
    gm = trace_model(model, x).gm if form == "module" else torch.export.export(model, (x,)).module()
    a = analyze_channel_groups(gm, x)
    reasons = {r for g in a.groups for r in g.pinned}
    assert not [r for r in reasons if "not understood" in r or "analysis failed" in r]
    assert any(g.removable and g.slices_with("producer") for g in a.groups)


@pytest.mark.parametrize("form", ["module", "export"])
@pytest.mark.parametrize("name", ["in_place_resize", "repeat_interleave", "gathers_and_windows", "outlook_and_max",
                                  "slice_write"])
def test_in_place_ops_resizing_repeats_and_factories_are_understood(form, name):
    ctor, shape = nets.TEST_NETS[name]
    torch.manual_seed(0)
    model, x = ctor().eval(), torch.randn(shape)
    gm = trace_model(model, x).gm if form == "module" else torch.export.export(model, (x,)).module()
    a = analyze_channel_groups(gm, x)
    assert not [r for g in a.groups for r in g.pinned if "not understood" in r or "analysis failed" in r]
    for producer in ("a.0.weight", "b.0.weight"):
        assert group_with(a, producer, "producer").removable


def test_fused_attention_loses_whole_heads_and_class_tokens_follow_the_channels():
    a = analysis_of(*nets_families.TEST_NETS["deit"])
    heads = group_with(a, "attn.qkv.weight", "producer")
    assert heads.removable and heads.size == 4 and heads.unit == 4
    assert [len(rows) for rows in slice_of(heads, "attn.qkv.weight", "producer").indices] == [12] * 4  # q, k, v
    stream = group_with(a, "embed.weight", "producer")
    for token in ("cls", "dist", "pos"):
        assert slice_of(stream, token, "follower").dim == 2


@pytest.mark.parametrize("form", ["module", "export"])
def test_einsum_attention_loses_whole_heads(form):
    ctor, shape = nets.TEST_NETS["einsum_attention"]
    torch.manual_seed(0)
    model, x = ctor().eval(), torch.randn(shape)
    gm = trace_model(model, x).gm if form == "module" else torch.export.export(model, (x,)).module()
    heads = group_with(analyze_channel_groups(gm, x), "attn.q.weight", "producer")
    assert heads.removable and heads.size == 4 and heads.unit == 4  # 4 heads of width 4
    assert {s.tensor for s in heads.slices if s.role == "producer"} >= {"attn.q.weight", "attn.k.weight",
                                                                        "attn.v.weight"}


def test_einsum_with_a_per_head_table_pins_the_heads():
    """A constant indexed by the heads would have to be sliced with them: not followed."""

    class PerHeadTable(nets.EinsumAttention):
        def forward(self, x):
            b, n, c = x.shape
            q = self.q(x).reshape(b, n, self.heads, c // self.heads)
            table = self.table[:self.heads * 2].reshape(self.heads, 2, c // self.heads)
            return torch.einsum("bqhd,hkd->bqhk", q, table).reshape(b, n, -1).mean(-1, keepdim=True)

    model, x = PerHeadTable(16, 4).eval(), torch.randn(1, 16, 16)
    a = analyze_channel_groups(trace_model(model, x).gm, x)
    heads = group_with(a, "q.weight", "producer")
    assert not heads.removable
    assert any("constant operand along entries that carry channels" in r for r in heads.pinned)


class _WholeVariance(nn.Module):
    """var(x, unbiased): a bool where the dim would be, a reduction over every element."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.o = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 2)

    def forward(self, x):
        y = self.a(x)
        return self.o(y.mean((2, 3)) / (torch.var(y, True) + 1))


class _MaskIndex(_WholeVariance):
    """y[:, mask] with a boolean mask over (C, H, W): a gather along the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", torch.rand(8, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5)

    def forward(self, x):
        return self.o(self.a(x)[:, self.mask].mean(1, keepdim=True).expand(-1, 8))


@pytest.mark.parametrize("form", ["module", "export"])
def test_whole_tensor_variance_couples_and_a_boolean_mask_pins(form):
    x = torch.randn(1, 3, 4, 4)
    for net, coupled in ((_WholeVariance(), True), (_MaskIndex(), False)):
        net.eval()
        gm = trace_model(net, x).gm if form == "module" else torch.export.export(net, (x,)).module()
        group = group_with(analyze_channel_groups(gm, x), "a.weight", "producer")
        if coupled:  # every channel feeds the one variance: they go together
            assert group.size == 1 and group.unit == 8 and group.removable
        else:
            assert group.pinned and not group.removable


def test_levit_attention_bias_table_follows_its_heads():
    a = analysis_of(*nets_families.TEST_NETS["levit"])
    heads = group_with(a, "attn.qkv.linear.weight", "producer")
    assert heads.removable and heads.size == 4
    table = slice_of(heads, "attn.biases", "follower")
    assert table.dim == 0 and table.indices == [[h] for h in range(4)]


def test_global_response_norm_couples_its_channels():
    """GRN divides every channel by the mean over channels of their spatial norms: a channel
    goes only with all the others."""
    a = analysis_of(*nets_families.TEST_NETS["convnext_v2"])
    hidden = group_with(a, "pw1.weight", "producer")
    assert hidden.size == 1 and hidden.unit == 32
    assert slice_of(hidden, "grn.gamma", "follower").indices == [list(range(32))]


def test_a_linear_over_tokens_passes_the_channels_through():
    a = analysis_of(*nets_families.TEST_NETS["resmlp"])
    stream = group_with(a, "embed.weight", "producer")
    assert stream.removable and not any(s.tensor == "tokens.weight" for s in stream.slices)
    assert {"n1.alpha", "n1.beta", "ls1", "ls2"} <= {s.tensor for s in stream.slices_with("follower")}


class RunningSums(nn.Module):
    """cumsum over H keeps a's channels apart (EdgeNeXt's positional mask); over channels it
    couples b's channels into one class."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.out(torch.cumsum(self.b(torch.relu(self.a(x)).cumsum(2)), dim=1))


@pytest.mark.parametrize("form", ["module", "export"])
def test_cumsum_couples_only_the_dim_it_runs_along(form):
    torch.manual_seed(0)
    model, x = RunningSums().eval(), torch.randn(1, 3, 8, 8)
    gm = trace_model(model, x).gm if form == "module" else torch.export.export(model, (x,)).module()
    a = analyze_channel_groups(gm, x)
    assert not [r for g in a.groups for r in g.pinned if "not understood" in r]
    assert group_with(a, "a.weight", "producer").size == 8  # eight classes of one channel each
    assert group_with(a, "b.weight", "producer").size == 1  # one class: the channels go together
