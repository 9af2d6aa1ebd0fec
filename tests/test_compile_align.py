"""Channel alignment (`--align`): removable zero channels kept so that kept counts are multiples the
hardware likes. Keeping a zero channel must never change the function; auto must never pick a
count its own record measured as slower; the cost model decides the same way every time."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import rwdeploy.compile as compile_mod
from rwdeploy import models
from rwdeploy import report as report_mod
from rwdeploy.errors import OptionError
from rwdeploy.io import Checkpoint, save_checkpoint
from rwdeploy.passes.channel_alignment import aligned_count, candidate_counts, parse_align, tail_cost
from rwdeploy.passes.channel_groups import analyze_channel_groups
from rwdeploy.passes.remove_zero_channels import RemoveZeroChannels, remove_zero_channels
from rwdeploy.passes.protocol import PassContext
from rwdeploy.passes.trace import trace_model
from rwdeploy.passes.whole_model_alignment import choose_alignment
from rwdeploy.runtime import align_timing
from rwdeploy.runtime.align_timing import target_lanes
from rwdeploy.passes.verify import first_diverging_node, verify_equivalence
from rwdeploy.runtime.ort_runner import OrtRunner
from channel_helpers import randomize_norms, zero_filters
from test_remove_channels import CASES, pruned

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Net(nn.Module):
    """Three channel groups with zero filters leaving counts 21 of 32, 19 of 24 and 14 of 16."""

    ZEROED = {"c1": range(0, 11), "c2": range(3, 8), "c3": range(0, 2)}

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c2 = nn.Conv2d(32, 24, 3, padding=1)
        self.c3 = nn.Conv2d(24, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net().eval()
    randomize_norms(net, seed)  # removed channels carry constants (BN shift, biases) that get folded
    with torch.no_grad():
        for name, rows in Net.ZEROED.items():
            getattr(net, name).weight[list(rows)] = 0
    return net


X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
PROBES = [X, torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 3]
MIN_KEPT = {"c1": 21, "c2": 19, "c3": 14}  # per producing conv: its group's kept count without alignment
SIZES = {"c1": 32, "c2": 24, "c3": 16}


def _rel(reference: torch.Tensor, output: torch.Tensor) -> float:
    return float((output - reference).abs().max() / reference.abs().max())


def _exact(original: nn.Module, slim: nn.Module, tol: float = 1e-5) -> None:
    with torch.no_grad():
        for x in PROBES:
            assert _rel(original(x), slim(x)) <= tol


def _out_channels(gm: nn.Module) -> dict[str, int]:
    return {name: gm.get_submodule(name).weight.shape[0] for name in SIZES}


def _expected_rounded(kept: int, size: int, n: int) -> int:
    """An independent rounding: the first multiple of n at or above kept, if the layer has that many."""
    up = -(-kept // n) * n
    return up if up <= size else kept


# --- the pure parts -------------------------------------------------------------------------------

def test_candidate_counts():
    assert candidate_counts(32, 21, 1, 8) == [21, 24]
    assert candidate_counts(16, 14, 1, 8) == [14, 16]
    assert candidate_counts(20, 17, 1, 8) == [17]  # 24 > 20 channels: nothing to round to
    assert candidate_counts(24, 16, 1, 8) == [16]  # already aligned
    assert candidate_counts(8, 3, 4, 8) == [3, 4]  # unit 4: 3 group channels are 12 tensor channels, 4 are 16
    assert aligned_count(5, 1, 4, 7) is None


def test_tail_cost_prefers_rounding_past_half_a_vector():
    # lanes 8: a tail of r channels costs 2r, a whole vector 8 -> rounding up pays when r > 4
    assert tail_cost(21, 8) == 16 + 10 and tail_cost(24, 8) == 24
    assert tail_cost(19, 8) == 16 + 6 < tail_cost(24, 8)
    assert tail_cost(20, 8) == tail_cost(24, 8)  # a tie: the smaller count wins (checked below)


@pytest.mark.parametrize("value, parsed", [("off", "off"), ("AUTO", "auto"), ("8", 8), (4, 4)])
def test_parse_align(value, parsed):
    assert parse_align(value) == parsed


@pytest.mark.parametrize("value", ["foo", "0", "-8", "8.5", ""])
def test_bad_align_names_the_option(value):
    with pytest.raises(OptionError, match="--align"):
        parse_align(value)
    with pytest.raises(OptionError, match="--align"):
        compile_mod.CompileOptions(out="x", align=value).validate()


def test_bad_align_cli_is_one_line(tmp_path, cli):
    res = cli("compile", "zoo:lenet5", "--align", "foo", "--out", str(tmp_path / "o"))
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("rwdeploy: error:") and "--align" in lines[0], res.stderr
    assert not (tmp_path / "o").exists()


# --- the pass ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def traced():
    net = make_net()
    return net, trace_model(net, X).gm


def test_off_removes_the_minimum(traced):
    net, gm = traced
    result = remove_zero_channels(gm, X)
    assert _out_channels(result.gm) == MIN_KEPT
    assert result.record.alignment is None and "alignment" not in result.record.to_dict()
    _exact(net, result.gm)


@pytest.mark.parametrize("n", [4, 8, 16])
def test_align_n_keeps_multiples_and_stays_exact(traced, n):
    net, gm = traced
    result = remove_zero_channels(gm, X, align=n)
    expected = {name: _expected_rounded(MIN_KEPT[name], SIZES[name], n) for name in SIZES}
    assert _out_channels(result.gm) == expected
    assert result.gm.fc.weight.shape[1] == expected["c3"]  # the consumers read what was kept
    _exact(net, result.gm)
    rec = result.record.alignment
    assert rec.mode == str(n) and rec.measured_on is None
    kept = {g.id: g.size - g.removed for g in rec.groups}
    for g in rec.groups:
        assert g.kept_for_alignment == g.removable - g.removed >= 0
        assert g.chosen == kept[g.id]
    assert sorted(kept.values()) == sorted(expected.values())
    removed = {g["id"]: g for g in result.record.to_dict()["removed_groups"]}
    for g in rec.groups:  # the removal's own list agrees, and counts alignment apart from give-backs
        if g.removed:
            assert removed[g.id]["removed"] == g.removed
            assert removed[g.id]["kept_for_alignment"] == g.kept_for_alignment
            assert removed[g.id]["kept_back"] == 0


@pytest.mark.parametrize("align", ["off", 4, 8, "auto"])
def test_resnet_stays_exact_with_alignment(align):
    """Residual stages are one group each (every producer keeps the same count); with alignment on
    and off the slim model computes the original's function."""
    torch.manual_seed(3)
    net = models.create("resnet20")
    randomize_norms(net, 3)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    gm = trace_model(net, x).gm
    zero_filters(net, analyze_channel_groups(gm, x), fraction=0.3, seed=5)
    result = remove_zero_channels(gm, x, align=align)  # auto without a measurer: the cost model
    with torch.no_grad():
        for probe in (x, x * 3 + 1):
            assert _rel(net(probe), result.gm(probe)) <= 1e-5
    if isinstance(align, int):
        groups = result.record.alignment.groups
        assert groups and all(g.size - g.removed == _expected_rounded(g.size - g.removable, g.size, align)
                              for g in groups)
        kept = {g.size - g.removed for g in groups}
        widths = {m.out_channels for m in result.gm.modules() if isinstance(m, nn.Conv2d)}
        assert kept <= widths and all(w % align == 0 for w in widths)


@pytest.mark.parametrize("case", sorted(CASES))
def test_alignment_is_exact_on_the_suite(case):
    """Every zoo and test network (residual stages, depthwise, grouped, concat, split, heads, ...):
    with --align 4 and with auto on a random measurer, the slim model computes the original's
    function, each group keeps the independently rounded count (or more, if a structural constraint
    says so), and auto's choice is the fastest the record shows."""
    ctor, shape = CASES[case]
    gm, x, analysis = pruned(ctor, shape)
    probes = [x, torch.randn((2,) + tuple(shape[1:]))]
    g = torch.Generator().manual_seed(0)

    def noisy(cases):
        return {k: {"median_ms": float(torch.randint(1, 4, (1,), generator=g))} for k in cases}

    for align, measurer in ((4, None), ("auto", noisy)):
        res = RemoveZeroChannels(analysis, align=align, lanes=4, min_macs=0)(gm, PassContext(x, measurer=measurer))
        v = verify_equivalence(gm, res.gm, probes, rtol=1e-4, record=res.record)
        assert v.passed, f"--align {align}: max_rel={v.max_rel} first diverging node {v.first_diverging_node}"
        assert first_diverging_node(gm, res.gm, (x,), record=res.record) is None
        assert res.record.alignment.groups  # pruned() zeroed channels in every removable group
        for rec in res.record.alignment.groups:
            least = rec.size - rec.removable
            up = next((k for k in range(least, rec.size + 1) if k * rec.unit % 4 == 0), least)
            assert rec.chosen in (least, up) and rec.size - rec.removed >= rec.chosen
            if align == 4:
                assert rec.chosen == up
            timed = {c["kept"]: c["median_ms"] for c in rec.candidates if "median_ms" in c}
            if timed:
                assert timed[rec.chosen] == min(timed.values())


class Preferring:
    """A fake measurer: each candidate's time is 1 ms, or 0.5 ms for the count it prefers per group
    (keyed by the smallest candidate). Records what it was given."""

    where = "fake"

    def __init__(self, prefer: dict[int, int]) -> None:
        self.prefer, self.calls = prefer, []

    def __call__(self, cases):
        self.calls.append(cases)
        base = min(cases)
        return {k: {"median_ms": 0.5 if self.prefer.get(base) == k else 1.0} for k in cases}


def test_auto_takes_the_count_the_measurer_prefers(traced):
    net, gm = traced
    fake = Preferring({21: 24, 19: 19, 14: 16})  # c1's group: round up; c2's: the minimum; c3's: round up
    p = RemoveZeroChannels(align="auto", lanes=8, min_macs=0)
    result = p(gm, PassContext(X, measurer=fake))
    assert _out_channels(result.gm) == {"c1": 24, "c2": 19, "c3": 16}
    _exact(net, result.gm)
    rec = result.record.alignment
    assert rec.measured_on == "fake" and len(fake.calls) == 3
    for g in rec.groups:
        assert g.reason.startswith("measured fastest")
        assert all("median_ms" in c for c in g.candidates)


def test_measurer_gets_the_layers_at_each_count(traced):
    _, gm = traced
    fake = Preferring({})
    RemoveZeroChannels(align="auto", lanes=8, min_macs=0)(gm, PassContext(X, measurer=fake))
    cases = next(c for c in fake.calls if min(c) == 21)  # c1's group: produced by c1, read by c2
    assert sorted(cases) == [21, 24]
    for k, layers in cases.items():
        shapes = {name: (m.in_channels, m.out_channels, tuple(shape)) for name, m, shape in layers}
        assert shapes == {"c1": (3, k, (1, 3, 16, 16)), "c2": (k, 19, (1, k, 16, 16))}
    cases = next(c for c in fake.calls if min(c) == 14)  # c3's group: c3 and the linear after the mean
    fc = {k: next(m for name, m, _ in layers if name == "fc") for k, layers in cases.items()}
    assert {k: (m.in_features, m.out_features) for k, m in fc.items()} == {14: (14, 10), 16: (16, 10)}


class Inverted(nn.Module):
    """An inverted residual's expand -> depthwise -> project; expand rows 0-4 zeroed: the depthwise
    channels after them are constant, so 5 of 24 channels go (19 kept)."""

    def __init__(self) -> None:
        super().__init__()
        self.expand, self.bn = nn.Conv2d(8, 24, 1), nn.BatchNorm2d(24)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.project = nn.Conv2d(24, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.relu(self.dw(torch.relu(self.bn(self.expand(x))))))


def test_depthwise_layers_are_measured_at_each_count():
    torch.manual_seed(0)
    net = Inverted().eval()
    randomize_norms(net, 0)
    with torch.no_grad():
        net.expand.weight[:5] = 0
    x = torch.randn(1, 8, 12, 12)
    fake = Preferring({19: 24})
    result = RemoveZeroChannels(align="auto", lanes=8, min_macs=0)(trace_model(net, x).gm, PassContext(x, measurer=fake))
    cases = next(c for c in fake.calls if min(c) == 19)
    for k, layers in cases.items():
        convs = {name: (m.in_channels, m.out_channels, m.groups) for name, m, _ in layers}
        assert convs == {"expand": (8, k, 1), "dw": (k, k, k), "project": (k, 8, 1)}
    assert result.gm.dw.weight.shape[0] == 24 and result.record.alignment.groups[0].kept_for_alignment == 5
    with torch.no_grad():
        assert _rel(net(x), result.gm(x)) <= 1e-5
    off = remove_zero_channels(trace_model(net, x).gm, x)
    assert off.gm.dw.weight.shape[0] == 19  # without alignment the 5 constant channels go


@pytest.mark.parametrize("seed", range(4))
def test_auto_never_chooses_a_count_measured_slower(traced, seed):
    """Random timings (ties included): the chosen count's time is the smallest in the record, and the
    model stays exact."""
    net, gm = traced
    g = torch.Generator().manual_seed(seed)

    def noisy(cases):
        return {k: {"median_ms": float(torch.randint(1, 4, (1,), generator=g)) / 10} for k in cases}

    result = RemoveZeroChannels(align="auto", lanes=8, min_macs=0)(gm, PassContext(X, measurer=noisy))
    for rec in result.record.alignment.groups:
        times = {c["kept"]: c["median_ms"] for c in rec.candidates}
        assert times[rec.chosen] == min(times.values())
        if list(times.values()).count(min(times.values())) > 1:
            assert rec.chosen == min(k for k, t in times.items() if t == min(times.values()))
        assert rec.size - rec.removed == rec.chosen
    _exact(net, result.gm)


def test_cost_model_fallback_is_deterministic(traced):
    net, gm = traced
    records = []
    for _ in range(2):
        result = remove_zero_channels(gm, X, align="auto", lanes=8)  # no measurer
        records.append(json.dumps(result.record.alignment.to_dict()))
        # tails past half a vector (21: 5, 14: 6) round up; 19 (a tail of 3) stays
        assert _out_channels(result.gm) == {"c1": 24, "c2": 19, "c3": 16}
        _exact(net, result.gm)
    assert records[0] == records[1]
    for g in result.record.alignment.groups:
        assert g.reason.startswith("cost model (not measured: no measurer)")
        costs = {c["kept"]: c["cost"] for c in g.candidates}
        assert costs == {k: tail_cost(k, 8) for k in costs}
        assert g.chosen == min(costs, key=lambda k: (costs[k], k))
    # a tie (a tail of exactly half a vector) keeps the minimum: lanes 4, 14 kept -> tail 2
    tie = remove_zero_channels(gm, X, align="auto", lanes=4).record.alignment
    c3 = next(g for g in tie.groups if g.size == 16)
    assert {c["kept"]: c["cost"] for c in c3.candidates} == {14: 16, 16: 16} and c3.chosen == 14


def test_small_failed_or_over_budget_groups_use_the_cost_model(traced):
    _, gm = traced

    def failing(cases):
        raise RuntimeError("device went away")

    rec = RemoveZeroChannels(align="auto", lanes=8, min_macs=0)(gm, PassContext(X, measurer=failing)).record.alignment
    assert all("measurement failed: RuntimeError: device went away" in g.reason for g in rec.groups)
    fake = Preferring({})
    rec = RemoveZeroChannels(align="auto", lanes=8, min_macs=0, max_measured=1)(
        gm, PassContext(X, measurer=fake)).record.alignment
    # the most work at the minimum: c1's group (c1 + c2: 256 x 21 x (27 + 19 x 9) MACs) over c2's (c2 + c3)
    assert 256 * 21 * (27 + 19 * 9) > 256 * 19 * (21 * 9 + 14)
    assert len(fake.calls) == 1 and min(fake.calls[0]) == 21
    assert sum(g.reason.startswith("measured") for g in rec.groups) == 1
    assert sum("over the budget of 1 measured groups" in g.reason for g in rec.groups) == 2
    rec = RemoveZeroChannels(align="auto", lanes=8)(gm, PassContext(X, measurer=Preferring({}))).record.alignment
    c3 = next(g for g in rec.groups if g.size == 16)  # 16x16 positions x 24x14 1x1 + a 14x10 linear
    assert "too small to time reliably" in c3.reason and f"{256 * 19 * 14 + 14 * 10:,} MACs" in c3.reason


# --- compile ----------------------------------------------------------------------------------------

def _compile(tmp_path, align, **kw):
    loaded = compile_mod.LoadedModel(make_net(), (1, 3, 16, 16), "module")
    options = compile_mod.CompileOptions(out=tmp_path / f"o-{align}", target="onnx", sparse="off", align=str(align),
                                         batches=(1,), **kw)
    return compile_mod.compile_model(loaded, options)


def test_compile_align_8_report_and_onnx(tmp_path):
    result = _compile(tmp_path, 8, measure=False)
    doc = result.report
    assert doc["verification"]["max_rel"] <= 1e-5
    al = doc["alignment"]
    assert al["mode"] == "8" and al["kept_for_alignment"] == (24 - 21) + (24 - 19) + (16 - 14)
    assert "alignment" not in doc["channels"]
    shapes = {row["name"]: row["shape_after"] for row in doc["layers"]}
    assert shapes["c1"][0] == 24 and shapes["c2"] == [24, 24, 3, 3] and shapes["c3"] == [16, 24, 1, 1]
    md = (result.out / "report.md").read_text()
    assert "## Channel alignment" in md and "rounded up to a multiple of 8 (--align 8)" in md
    assert "| zero channels kept for alignment |  | 10 | --align 8 |" in md  # the summary (also the CLI's)
    assert json.loads((result.out / "report.json").read_text())["alignment"] == al
    runner, net = OrtRunner(result.out / "slim.onnx"), make_net()  # the shipped file computes the original
    with torch.no_grad():
        for x in PROBES:
            assert _rel(net(x), torch.from_numpy(runner.run(x.numpy()))) <= 1e-5


def test_compile_align_off_has_no_section(tmp_path):
    doc = _compile(tmp_path, "off", measure=False).report
    assert "alignment" not in doc and doc["verification"]["max_rel"] <= 1e-5


def test_compile_auto_without_measuring_uses_the_cost_model(tmp_path):
    al = _compile(tmp_path, "auto", measure=False).report["alignment"]
    assert al["measured_on"] is None and al["note"].startswith("--no-measure: no whole-model choice")
    assert "whole_model" not in al
    choices = [g for g in al["groups"] if len(g["candidates"]) > 1]  # the others: nothing to choose
    assert choices and all(g["reason"].startswith("cost model (not measured: no measurer)") for g in choices)


def test_compile_auto_measures_in_onnx_runtime(tmp_path):
    """The real measurers, once (no assertion on the times themselves): four candidates and the
    original timed as whole models in ONNX Runtime, the chosen one the fastest in the record, exact."""
    result = _compile(tmp_path, "auto", runs=3, warmup=1, min_time_s=0.0)
    doc = result.report
    al, whole = doc["alignment"], doc["alignment"]["whole_model"]
    assert al["mode"] == "auto" and "onnxruntime" in al["measured_on"] and "batch 1" in whole["measured_on"]
    rows = {r["name"]: r for r in whole["candidates"]}
    assert list(rows) == ["off", f"N={LANES // 2}", f"N={LANES}", "per-group"]
    assert rows[whole["chosen"]]["median_ms"] == min(r["median_ms"] for r in rows.values())
    assert whole["original_ms"] > 0 and doc["verification"]["max_rel"] <= 1e-5
    assert report_mod.alignment_line(whole) in (result.out / "report.md").read_text()


# --- whole-model choice -------------------------------------------------------------------------------

LANES = target_lanes("onnx")


def _shape_key(model: nn.Module) -> tuple[int, int, int]:
    return tuple(model.get_submodule(name).weight.shape[0] for name in SIZES)


class WholeFake:
    """A fake whole-model measurer: a model's time is looked up by its conv widths (`times`, else 1 ms),
    so it tells the candidates apart by what they are, not by their names; checks each model it is
    given against the original net on the probes."""

    where = "fake whole-model timer"

    def __init__(self, net: nn.Module, times: dict[tuple[int, int, int], float]) -> None:
        self.net, self.times, self.calls = net, times, []

    def __call__(self, models):
        self.calls.append({name: _shape_key(m) for name, m in models.items()})
        for m in models.values():
            _exact(self.net, m)  # every candidate (and the reference) computes the original
        return {name: {"median_ms": self.times.get(_shape_key(m), 1.0), "n": 7} for name, m in models.items()}


# the candidates' conv widths for Net with 16 lanes: off, N=8, N=16 (c2: no multiple of 16 in 19..24),
# per-group without a layer measurer (cost model: c1 21 of 26 < 32, c3 16 of 16 < 28)
WIDTHS_16 = {"off": (21, 19, 14), "N=8": (24, 24, 16), "N=16": (32, 19, 16), "per-group": (21, 19, 16)}


@pytest.mark.parametrize("seed", range(4))
def test_whole_model_auto_chooses_the_fastest_measured(traced, seed):
    net, gm = traced
    g = torch.Generator().manual_seed(seed)
    times = {w: float(t) for w, t in zip(WIDTHS_16.values(), torch.rand(4, generator=g) + 0.1)}
    times[(32, 24, 16)] = 0.5  # the original
    fake = WholeFake(net, times)
    result = choose_alignment(gm, X, measurer=fake, lanes=16, batch=1)
    assert fake.calls == [{"original": (32, 24, 16), **WIDTHS_16}]
    fastest = min(WIDTHS_16, key=lambda n: times[WIDTHS_16[n]])
    assert _out_channels(result.gm) == dict(zip(SIZES, WIDTHS_16[fastest]))
    _exact(net, result.gm)
    whole = result.record.alignment.whole_model
    medians = {r["name"]: r["median_ms"] for r in whole["candidates"]}
    assert whole["chosen"] == fastest and medians[fastest] == min(medians.values())
    assert medians == {n: times[w] for n, w in WIDTHS_16.items()} and whole["original_ms"] == 0.5
    for r in whole["candidates"]:
        assert r["speedup_vs_original"] == pytest.approx(0.5 / times[WIDTHS_16[r["name"]]], rel=1e-12)
    assert result.record.alignment.mode == "auto" and result.record.alignment.measured_on == "fake whole-model timer"


def test_whole_model_auto_records_the_chosen_plan_and_renders(traced):
    net, gm = traced
    fake = WholeFake(net, {WIDTHS_16["N=8"]: 0.4, (32, 24, 16): 0.6})
    rec = choose_alignment(gm, X, measurer=fake, lanes=16, batch=1).record
    al = rec.to_dict()["alignment"]
    assert al["whole_model"]["chosen"] == "N=8" and al["multiple"] == 8
    assert al["kept_for_alignment"] == (24 - 21) + (24 - 19) + (16 - 14)  # the N=8 plan's rows
    assert {g["kept"] for g in al["groups"]} == {24, 16}
    line = report_mod.alignment_line(al["whole_model"])
    assert line == "alignment: auto chose N=8 (1.50x vs original at batch 1; off 0.60x, N=16 0.60x, per-group 0.60x)"
    md = report_mod.markdown(report_mod.view({"alignment": al}))
    assert "`--align auto` chose `N=8` for the whole model" in md and "| N=8 (chosen) | 8 | 10 |" in md
    assert "| original (dense, reference) |" in md


def test_whole_model_auto_can_choose_off(traced):
    net, gm = traced
    fake = WholeFake(net, {WIDTHS_16["off"]: 0.3})
    result = choose_alignment(gm, X, measurer=fake, lanes=16)
    assert _out_channels(result.gm) == MIN_KEPT
    al = result.record.alignment
    assert al.whole_model["chosen"] == "off" and al.groups == [] and al.to_dict()["kept_for_alignment"] == 0


def test_whole_model_per_group_candidate_uses_the_layer_measurer(traced):
    net, gm = traced
    # c1's group timed (21 preferred over 32); c3's too small to time: the cost model rounds it to 16
    layers = Preferring({21: 21})
    fake = WholeFake(net, {(21, 19, 16): 0.3})
    result = choose_alignment(gm, X, measurer=fake, lanes=16, layer_measurer=layers)
    assert [sorted(c) for c in layers.calls] == [[21, 32]] and fake.calls[0]["per-group"] == (21, 19, 16)
    assert _out_channels(result.gm) == {"c1": 21, "c2": 19, "c3": 16}
    whole = result.record.alignment.whole_model
    assert whole["chosen"] == "per-group" and whole["groups_measured_on"] == "fake"
    assert result.record.alignment.measured_on == "fake whole-model timer"
    md = report_mod.markdown(report_mod.view({"alignment": result.record.alignment.to_dict()}))
    assert "its groups' layers timed on fake." in md


def test_whole_model_candidates_that_are_the_same_model_are_timed_once(traced):
    net, gm = traced
    # 32 lanes: N=16 (32, 19, 16); N=32 (32, 19, 14); the per-group cost model rounds c1 to 32 (21 costs 42)
    # and can round neither c2 nor c3 (no multiple of 32 within 24 or 16 channels): the N=32 model
    fake = WholeFake(net, {(32, 19, 16): 0.9, (32, 19, 14): 0.7, (21, 19, 14): 0.8})
    result = choose_alignment(gm, X, measurer=fake, lanes=32)
    assert fake.calls == [{"original": (32, 24, 16), "off": (21, 19, 14), "N=16": (32, 19, 16), "N=32": (32, 19, 14)}]
    rows = {r["name"]: r for r in result.record.alignment.whole_model["candidates"]}
    assert rows["per-group"]["same_as"] == "N=32" and rows["per-group"]["median_ms"] == 0.7
    assert result.record.alignment.whole_model["chosen"] == "N=32"  # the earlier of two equal models


def test_whole_model_measurement_failure_keeps_the_per_group_plan(traced):
    net, gm = traced

    def broken(models):
        raise RuntimeError("no runtime")

    result = choose_alignment(gm, X, measurer=broken, lanes=16)
    assert _out_channels(result.gm) == dict(zip(SIZES, WIDTHS_16["per-group"]))
    whole = result.record.alignment.whole_model
    assert whole["chosen"] == "per-group" and whole["candidates"] == []
    assert whole["reason"].startswith("whole-model measurement failed (RuntimeError: no runtime)")
    _exact(net, result.gm)


def test_compile_auto_uses_the_injected_whole_model_timer(tmp_path, monkeypatch):
    """compile's stage hands the whole-model choice an ORT timer at batch 1; with a fake in its place,
    the compiled model is the candidate the fake says is fastest, and the report says so. The layer
    timer is faked too: real ORT timings would decide the per-group plan (c1 21 or 32) by the load."""
    made = []
    monkeypatch.setattr(align_timing, "OrtLayerTimer", lambda target, **kw: Preferring({21: 21}))

    def fake_timer(example, target, **kw):
        made.append((tuple(example.shape), target, kw))
        return WholeFake(make_net(), {WIDTHS_16["N=16"]: 0.2, (32, 24, 16): 0.5})

    monkeypatch.setattr(align_timing, "OrtModelTimer", fake_timer)
    monkeypatch.setattr(align_timing, "target_lanes", lambda target: 16)
    result = _compile(tmp_path, "auto", measure=True, runs=1, warmup=0, min_time_s=0.0)
    assert made and made[0][0] == (1, 3, 16, 16) and made[0][1] == "onnx"
    doc = result.report
    shapes = {row["name"]: row["shape_after"][0] for row in doc["layers"] if row["name"] in SIZES}
    assert shapes == dict(zip(SIZES, WIDTHS_16["N=16"])) and doc["verification"]["max_rel"] <= 1e-5
    assert doc["alignment"]["whole_model"]["chosen"] == "N=16"
    md = (result.out / "report.md").read_text()
    assert "alignment: auto chose N=16 (2.50x vs original at batch 1; off 0.50x, N=8 0.50x, per-group 0.50x)" in md


@pytest.mark.parametrize("batches, align_batch, timed_at", [((8, 1), None, 8), ((1, 8), 4, 4)])
def test_compile_auto_times_at_the_deployment_batch(tmp_path, monkeypatch, batches, align_batch, timed_at):
    """The candidates are timed at --align-batch, else the first --batch: the record, the
    report's line and the timer's input all carry that batch size."""
    made = []
    monkeypatch.setattr(align_timing, "OrtLayerTimer", lambda target, **kw: Preferring({21: 21}))

    def fake_timer(example, target, **kw):
        made.append(tuple(example.shape))
        return WholeFake(make_net(), {WIDTHS_16["N=8"]: 0.2, (32, 24, 16): 0.5})

    monkeypatch.setattr(align_timing, "OrtModelTimer", fake_timer)
    monkeypatch.setattr(align_timing, "target_lanes", lambda target: 16)
    loaded = compile_mod.LoadedModel(make_net(), (1, 3, 16, 16), "module")
    options = compile_mod.CompileOptions(out=tmp_path / "o", target="onnx", sparse="off", align="auto",
                                         batches=batches, align_batch=align_batch, runs=1, warmup=0,
                                         min_time_s=0.0)
    result = compile_mod.compile_model(loaded, options)
    whole = result.report["alignment"]["whole_model"]
    assert made == [(timed_at, 3, 16, 16)] and whole["batch"] == timed_at and whole["chosen"] == "N=8"
    assert f"(2.50x vs original at batch {timed_at};" in (result.out / "report.md").read_text()


def test_compile_align_batch_must_be_positive_and_with_auto(tmp_path):
    options = compile_mod.CompileOptions(out=tmp_path / "o", target="onnx", align="auto", align_batch=0)
    with pytest.raises(OptionError, match="--align-batch 0 must be a positive batch size"):
        options.validate()
    off = compile_mod.CompileOptions(out=tmp_path / "o", target="onnx", align="off", align_batch=8)
    with pytest.raises(OptionError, match="--align-batch times --align auto's candidates; --align off"):
        off.validate()
    assert not (tmp_path / "o").exists()


def test_compile_auto_for_cpu_times_the_tvm_build(tmp_path, monkeypatch):
    """--target cpu ships the TVM build, so its whole-model choice is timed there (`TvmModelTimer`),
    not in ONNX Runtime: the compiled model is the candidate that timer says is fastest."""
    pytest.importorskip("tvm")
    made = []
    monkeypatch.setattr(align_timing, "OrtLayerTimer", lambda target, **kw: Preferring({21: 21}))

    def ort_timer(*a, **kw):
        raise AssertionError("ONNX Runtime timed the whole models of a --target cpu compile")

    def tvm_timer(example, target, **kw):
        made.append((tuple(example.shape), target))
        return WholeFake(make_net(), {WIDTHS_16["N=8"]: 0.2, (32, 24, 16): 0.5})

    monkeypatch.setattr(align_timing, "OrtModelTimer", ort_timer)
    monkeypatch.setattr(align_timing, "TvmModelTimer", tvm_timer)
    monkeypatch.setattr(align_timing, "target_lanes", lambda target: 16)
    loaded = compile_mod.LoadedModel(make_net(), (1, 3, 16, 16), "module")
    options = compile_mod.CompileOptions(out=tmp_path / "o", target="cpu", sparse="off", align="auto",
                                         batches=(1,), runs=1, warmup=0, min_time_s=0.0)
    doc = compile_mod.compile_model(loaded, options).report
    assert made == [((1, 3, 16, 16), "cpu")]
    assert doc["alignment"]["whole_model"]["chosen"] == "N=8"
    shapes = {row["name"]: row["shape_after"][0] for row in doc["layers"] if row["name"] in SIZES}
    assert shapes == dict(zip(SIZES, WIDTHS_16["N=8"])) and doc["verification"]["max_rel"] <= 1e-5


def test_tvm_model_timer_builds_and_times_every_candidate(monkeypatch):
    """The real timer: each candidate is built by rwdeploy's cpu build (its output is the module's)
    and timed in the same interleaved rounds; progress names each build."""
    pytest.importorskip("tvm")
    from rwdeploy.runtime import tvm_build

    net = make_net()
    slim = remove_zero_channels(torch.fx.symbolic_trace(net), X).gm
    said, built = [], []
    real_build = tvm_build.build

    def spy(module, example, target, **kw):
        art = real_build(module, example, target, **kw)
        with torch.no_grad():
            want = module(example).numpy()
        got = tvm_build.run_local(art, example)
        built.append(float(np.abs(got - want).max() / np.abs(want).max()))
        return art

    timer = align_timing.TvmModelTimer(X, "cpu", threads=1, warmup=1, min_runs=5, min_time_s=0.0,
                                       progress=said.append)
    monkeypatch.setattr(tvm_build, "build", spy)
    times = timer({"original": net, "off": slim})
    assert set(times) == {"original", "off"} and all(t["n"] >= 5 and t["median_ms"] > 0 for t in times.values())
    assert len(built) == 2 and max(built) < 1e-4
    assert said == ["building candidate 1/2 (original) with TVM", "building candidate 2/2 (off) with TVM"]
    assert "TVM build for target 'cpu'" in timer.where and "batch 1" in timer.where


def _lenet_zeroed() -> nn.Module:
    """LeNet-5 with 20 -> 11, 50 -> 37 and 500 -> 400 filters left; conv2's channels reach fc1
    through flatten (16 columns each)."""
    torch.manual_seed(0)
    net = models.create("lenet5")
    with torch.no_grad():
        net.conv1.weight[:9] = 0
        net.conv2.weight[5:18] = 0
        net.fc1.weight[100:200] = 0
    return net


def test_cli_align_8(tmp_path, cli):
    path = tmp_path / "net.pt"
    save_checkpoint(Checkpoint("lenet5", _lenet_zeroed().state_dict(), (1, 1, 28, 28)), path)
    res = cli("compile", str(path), "--target", "onnx", "--align", "8", "--no-measure", "--sparse", "off",
              "--out", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "o" / "report.json").read_text())
    shapes = {row["name"]: row["shape_after"] for row in doc["layers"]}
    assert shapes == {"conv1": [16, 1, 5, 5], "conv2": [40, 16, 5, 5], "fc1": [400, 640], "fc2": [10, 400]}
    assert doc["verification"]["max_rel"] <= 1e-5


def test_flatten_consumer_is_measured_at_its_columns():
    net = _lenet_zeroed()
    x = torch.randn(1, 1, 28, 28)
    fake = Preferring({})
    result = RemoveZeroChannels(align="auto", lanes=8, min_macs=0)(trace_model(net, x).gm, PassContext(x, measurer=fake))
    cases = next(c for c in fake.calls if min(c) == 37)  # conv2's group, read by fc1 through flatten
    fc1 = {k: next(m for name, m, _ in layers if name == "fc1") for k, layers in cases.items()}
    assert {k: (m.in_features, m.out_features) for k, m in fc1.items()} == {37: (37 * 16, 400), 40: (40 * 16, 400)}
    with torch.no_grad():
        assert _rel(net(x), result.gm(x)) <= 1e-5
