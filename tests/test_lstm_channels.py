"""LSTM layers in the channel passes (`passes/ops/recurrent.py`), as module calls and as aten.lstm:
input channels cut from weight_ih (constants folded into bias_ih), hidden units with zero gate
rows or no readers removed in both directions alike, exact against the original model."""
from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from rwdeploy import compile as compile_mod
from rwdeploy.compile import _plain
from rwdeploy.passes.channel_groups import analyze_channel_groups
from rwdeploy.passes.remove_zero_channels import remove_zero_channels
from rwdeploy.passes.trace import trace_model
from rwdeploy.passes.verify import verify_equivalence

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IN, HIDDEN, OUT = 12, 8, 5


class Recurrent(nn.Module):
    """Linear -> LSTM over a [batch, tokens, channels] sequence -> Linear."""

    def __init__(self, bidirectional: bool = True, bias: bool = True) -> None:
        super().__init__()
        self.embed = nn.Linear(6, IN)
        self.rnn = nn.LSTM(IN, HIDDEN, batch_first=True, bidirectional=bidirectional, bias=bias)
        self.head = nn.Linear(HIDDEN * (1 + bidirectional), OUT)

    def forward(self, x):
        y, _ = self.rnn(torch.relu(self.embed(x)))
        return self.head(y)


def _zeroed(bidirectional: bool = True, bias: bool = True) -> nn.Module:
    """embed rows 0-3 zero with a bias (channels 0, 1 constant, 2, 3 zero); forward units 1 and 5
    dead (zero gate rows and biases), backward unit 2 dead and unit 6 unread (zero weight_hh column
    and head column); the head reads no output of forward unit 3."""
    torch.manual_seed(0)
    net = Recurrent(bidirectional, bias).eval()
    with torch.no_grad():
        net.embed.weight[:4] = 0
        net.embed.bias[2:4] = 0
        for unit in (1, 5):
            _kill(net.rnn, "", unit)
        net.head.weight[:, 3] = 0
        if bidirectional:
            _kill(net.rnn, "_reverse", 2)
            net.rnn.weight_hh_l0_reverse[:, 6] = 0
            net.head.weight[:, HIDDEN + 6] = 0
    return net


def _kill(rnn: nn.LSTM, suffix: str, unit: int) -> None:
    rows = [unit + g * HIDDEN for g in range(4)]
    for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        t = getattr(rnn, f"{kind}_l0{suffix}", None)
        if t is not None:
            t[rows] = 0


def _graph(net: nn.Module, x: torch.Tensor, form: str) -> fx.GraphModule:
    if form == "traced_program":  # compile's path for a .pt2: its module traced (h0, c0 constants)
        return trace_model(_plain(torch.export.export(net, (x,)).module()), x).gm
    if form == "module":
        gm = trace_model(net, x).gm
        assert any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.LSTM) for n in gm.graph.nodes)
        return gm
    program = torch.export.export(net, (x,)).module()
    gm = fx.GraphModule(program, program.graph)
    assert any("lstm" in str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    return gm


def _lstm_shapes(gm: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k.rpartition(".")[2]: tuple(v.shape) for k, v in gm.state_dict().items() if "_l0" in k}


@pytest.mark.parametrize("form", ["module", "export", "traced_program"])
def test_bidirectional_lstm_loses_input_channels_and_hidden_units_exactly(form):
    net = _zeroed()
    x = torch.randn(2, 7, 6)
    gm = _graph(net, x, form)
    res = remove_zero_channels(gm, x)
    probes = [x, torch.randn(3, 7, 6) if form == "module" else torch.randn(2, 7, 6), 4 * torch.randn(2, 7, 6)]
    assert verify_equivalence(net, res.gm, probes, record=res.record).passed
    shapes = _lstm_shapes(res.gm)
    # 12 inputs - 4 (zero embed rows); forward loses units 1, 5 (and 3 is read by weight_hh: kept),
    # backward loses 2 and 6: 6 units in each direction
    assert shapes["weight_ih_l0"] == (24, 8) and shapes["weight_hh_l0"] == (24, 6)
    assert shapes["weight_ih_l0_reverse"] == (24, 8) and shapes["bias_hh_l0_reverse"] == (24,)
    assert res.gm.get_submodule("head").weight.shape == (OUT, 12) if form == "module" else True
    assert any(c.folded == "bias" for c in res.record.layers if "rnn" in c.name or "lstm" in c.name)
    assert not any("lstm" in r for g in res.record.pinned_groups for r in g["reasons"])


@pytest.mark.parametrize("form", ["module", "export"])
def test_directions_lose_the_same_number_of_units(form):
    """Forward has two dead units, backward one: both keep HIDDEN - 1 (one hidden_size)."""
    net = _zeroed()
    with torch.no_grad():  # backward unit 6 read again
        net.head.weight[:, HIDDEN + 6] = 1.0
    x = torch.randn(2, 5, 6)
    res = remove_zero_channels(_graph(net, x, form), x)
    assert verify_equivalence(net, res.gm, [x, torch.randn(2, 5, 6)], record=res.record).passed
    shapes = _lstm_shapes(res.gm)
    assert shapes["weight_hh_l0"] == (28, 7) and shapes["weight_hh_l0_reverse"] == (28, 7)


def test_unidirectional_lstm_in_both_forms():
    net = _zeroed(bidirectional=False)
    x = torch.randn(1, 9, 6)
    for form in ("module", "export"):
        res = remove_zero_channels(_graph(net, x, form), x)
        assert verify_equivalence(net, res.gm, [x, torch.randn(1, 9, 6)], record=res.record).passed
        assert _lstm_shapes(res.gm)["weight_hh_l0"] == (24, 6)


def test_lstm_without_biases_keeps_its_inputs_and_says_why():
    net = _zeroed(bias=False)
    x = torch.randn(1, 4, 6)
    a = analyze_channel_groups(trace_model(net, x).gm, x)
    assert any("nowhere to fold" in r for g in a.groups for r in g.pinned)
    res = remove_zero_channels(trace_model(net, x).gm, x)
    assert verify_equivalence(net, res.gm, [x, torch.randn(1, 4, 6)], record=res.record).passed
    assert _lstm_shapes(res.gm)["weight_ih_l0"][1] == IN


def test_given_initial_state_and_stacked_lstms_are_pinned_with_their_reason():
    class GivenState(Recurrent):
        def forward(self, x):
            h = torch.ones(2, x.shape[0], HIDDEN)
            y, _ = self.rnn(self.embed(x), (h, h))
            return self.head(y)

    x = torch.randn(1, 4, 6)
    a = analyze_channel_groups(trace_model(GivenState().eval(), x).gm, x)
    assert any("LSTM called with extra arguments" in r for g in a.groups for r in g.pinned)
    program = torch.export.export(GivenState().eval(), (x,)).module()
    a = analyze_channel_groups(program, x)
    assert any("initial state other than zeros" in r for g in a.groups for r in g.pinned)

    stacked = Recurrent().eval()
    stacked.rnn = nn.LSTM(IN, HIDDEN, num_layers=2, batch_first=True, bidirectional=True)
    a = analyze_channel_groups(trace_model(stacked, x).gm, x)
    assert any("stacked LSTM (num_layers=2)" in r for g in a.groups for r in g.pinned)


class ReadsFinalState(Recurrent):
    """Classifies from the sequence and from h_n (directions side by side)."""

    def __init__(self) -> None:
        super().__init__()
        self.state_head = nn.Linear(2 * HIDDEN, OUT)

    def forward(self, x):
        y, (h, _) = self.rnn(torch.relu(self.embed(x)))
        return self.head(y).mean(1) + self.state_head(h.permute(1, 0, 2).reshape(x.shape[0], -1))


@pytest.mark.parametrize("form", ["module", "export"])
def test_a_read_final_state_keeps_removal_exact(form):
    """h_n carries the units on [direction, unit]: a unit goes only where it goes in both directions."""
    torch.manual_seed(0)
    net = ReadsFinalState().eval()
    with torch.no_grad():
        for suffix in ("", "_reverse"):
            _kill(net.rnn, suffix, 4)  # unit 4 dead in both directions: removable
    x = torch.randn(2, 6, 6)
    res = remove_zero_channels(_graph(net, x, form), x)
    assert verify_equivalence(net, res.gm, [x, torch.randn(2, 6, 6)], record=res.record).passed
    assert _lstm_shapes(res.gm)["weight_hh_l0"] == (28, 7)


def test_layer_statistics_count_the_lstm():
    """Per sample: 7 steps x 2 directions x 4 gates x 8 units x (12 inputs + 8 units) MACs."""
    from rwdeploy.passes.layer_stats import layer_stats

    net = Recurrent().eval()
    x = torch.randn(2, 7, 6)
    for gm in (_graph(net, x, "module"), _graph(net, x, "export")):
        rows = {s.type: s for s in layer_stats(gm, x)}
        assert rows["LSTM"].macs == 7 * 2 * 4 * HIDDEN * (IN + HIDDEN)
        assert rows["LSTM"].params == 2 * (4 * HIDDEN * (IN + HIDDEN) + 2 * 4 * HIDDEN)


@pytest.mark.parametrize("form", ["module", "pt2"])
def test_compile_ships_an_exact_slim_onnx_of_an_lstm(tmp_path, form):
    """compile end to end: the slim ONNX (ONNX Runtime's LSTM) matches the zeroed model."""
    net, x = _zeroed(), torch.randn(2, 7, 6)
    model = net if form == "module" else torch.export.export(net, (x,)).module()
    loaded = compile_mod.LoadedModel(model, tuple(x.shape), form)
    options = compile_mod.CompileOptions(out=tmp_path / form, target="onnx", sparse="off", batches=(2,), measure=False)
    result = compile_mod.compile_model(loaded, options)
    assert result.report["verification"]["max_rel"] <= 1e-5
    assert result.report["verification"]["onnxruntime"]["slim"]["max_rel"] <= 1e-4
    # and independently: a fresh input through stock ONNX Runtime against the zeroed torch model
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / form / "slim.onnx"), providers=["CPUExecutionProvider"])
    probe = 3 * torch.randn(2, 7, 6)
    got = session.run(None, {session.get_inputs()[0].name: probe.numpy()})[0]
    with torch.no_grad():
        want = net(probe)
    assert float((torch.from_numpy(got) - want).abs().max()) <= 1e-4 * float(want.abs().max())
    shapes = {row["name"]: row["shape_after"] for row in result.report["layers"]}
    assert [v for k, v in shapes.items() if "rnn" in k or "lstm" in k] == [[48, 14]]  # 2 x 4 x 6 units, 8 + 6


class StepVaryingInput(Recurrent):
    """A learned table added per step: a zeroed embed row's channel is then a constant that
    varies along the sequence, which no bias of the LSTM can stand for."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = nn.Parameter(torch.randn(7, IN))

    def forward(self, x):
        y, _ = self.rnn(torch.relu(self.embed(x)) + self.steps)
        return self.head(y)


@pytest.mark.parametrize("form", ["module", "export"])
def test_inputs_whose_constant_varies_along_the_sequence_stay(form):
    torch.manual_seed(0)
    net = StepVaryingInput().eval()
    with torch.no_grad():
        net.embed.weight[:4] = 0
    x = torch.randn(2, 7, 6)
    res = remove_zero_channels(_graph(net, x, form), x)
    assert verify_equivalence(net, res.gm, [x, 3 * torch.randn(2, 7, 6)], record=res.record).passed
    assert _lstm_shapes(res.gm)["weight_ih_l0"] == (4 * HIDDEN, IN)  # all 12 inputs kept


def test_alignment_record_counts_what_the_lstm_kept_as_not_removed():
    """With --align the record is filled in once the selection is final: the embed channels the
    LSTM could not fold stay, and are neither counted removed nor kept for alignment."""
    torch.manual_seed(0)
    net = StepVaryingInput().eval()
    with torch.no_grad():
        net.embed.weight[:4] = 0
    x = torch.randn(2, 7, 6)
    res = remove_zero_channels(_graph(net, x, "module"), x, align=4)
    assert _lstm_shapes(res.gm)["weight_ih_l0"] == (4 * HIDDEN, IN)
    embed = [g for g in res.record.alignment.groups if g.size == IN]
    assert embed and all(g.removed == 0 and g.kept_for_alignment == 0 for g in embed)
    assert verify_equivalence(net, res.gm, [x], record=res.record).passed
