"""`.pt2` parity of sparse packing: a layer packs the same whether the graph calls it as a module
(`self.fc(x)`), a torch function (`F.linear(x, self.w)`) or an ATen op (`aten.linear`,
`aten.conv2d`, core-ATen `aten.convolution` in a loaded `.pt2` program): the same choices, the
same CSR/BSR arrays, the same output, all against the dense model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from rwdeploy.compile import _plain
from rwdeploy.io import load_model
from rwdeploy.passes.layer_stats import layer_stats
from rwdeploy.passes.pack_sparse import pack_sparse
from rwdeploy.passes.trace import trace_model
from rwdeploy.runtime import tvm_build
from rwdeploy.sparse import CsrConv2d, CsrLinear

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARRAYS = ("values", "indices", "indptr", "bias")


def sparsify(model: nn.Module, frac: float, seed: int = 0) -> nn.Module:
    """Zero `frac` of the weights of every conv / linear layer but the last."""
    g = torch.Generator().manual_seed(seed)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]
    with torch.no_grad():
        for m in layers:
            m.weight[torch.rand(m.weight.shape, generator=g) < frac] = 0
    return model.eval()


class Mlp(nn.Module):
    def __init__(self, sizes=(256, 128, 64, 10)):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvNet(nn.Module):
    """Strided, padded, dilated and grouped 2-D convolutions, one with every setting at its
    default (a .pt2 call then names none), then a linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=2, dilation=2, groups=4, bias=False)
        self.c3 = nn.Conv2d(32, 32, (1, 3), stride=(1, 2), padding=(0, 1), groups=2)
        self.c4 = nn.Conv2d(32, 24, 1)
        self.fc = nn.Linear(24 * 8 * 4, 8)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        return self.fc(torch.relu(self.c4(x)).flatten(1))


class FunctionalConvNet(nn.Module):
    """ConvNet's layers as F.conv2d / F.linear on the same parameters (settings as ints and lists)."""

    def __init__(self, net: ConvNet):
        super().__init__()
        for name in ("c1", "c2", "c3", "c4", "fc"):
            layer = getattr(net, name)
            self.register_parameter(f"{name}_w", layer.weight)
            self.register_parameter(f"{name}_b", layer.bias)

    def forward(self, x):
        x = torch.relu(F.conv2d(x, self.c1_w, self.c1_b, 2, 1))
        x = torch.relu(F.conv2d(x, self.c2_w, None, stride=1, padding=2, dilation=2, groups=4))
        x = torch.relu(F.conv2d(x, self.c3_w, self.c3_b, [1, 2], [0, 1], 1, 2))
        x = torch.relu(F.conv2d(x, self.c4_w, self.c4_b))
        return F.linear(x.flatten(1), self.fc_w, self.fc_b)


def module_graph(model: nn.Module) -> fx.GraphModule:
    return fx.symbolic_trace(model)


def pt2_graph(model: nn.Module, x: torch.Tensor, path, core_aten: bool = False) -> fx.GraphModule:
    """The model saved as a `.pt2` program (dynamic batch) and loaded and traced as `rwdeploy
    compile` does."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    example = torch.cat([x, x])[:2]  # an example of batch 1 would fix the batch size
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    if core_aten:  # convolutions become aten.convolution
        program = program.run_decompositions()
    torch.export.save(program, str(path))
    loaded = load_model(path)
    return trace_model(_plain(loaded.module), x).gm


def call_targets(gm: fx.GraphModule) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


def packed_modules(gm: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in gm.named_modules() if isinstance(m, (CsrLinear, CsrConv2d))}


def assert_same_packing(reference, other, kinds=("linear", "conv2d")) -> None:
    """Same choices and bytes in the records; the same CSR/BSR arrays and settings per layer
    (layers in the same order: their names may differ, e.g. weights named differently)."""
    ref_layers = [l for l in reference.record.layers if l.kind in kinds]
    layers = [l for l in other.record.layers if l.kind in kinds]
    ref_rec = [(l.kind, l.weight_shape, l.chosen, l.packed_bytes) for l in ref_layers]
    assert [(l.kind, l.weight_shape, l.chosen, l.packed_bytes) for l in layers] == ref_rec
    ref_mods, other_mods = packed_modules(reference.gm), packed_modules(other.gm)
    pairs = [(a.module, b.module) for a, b in zip(ref_layers, layers) if a.module]
    assert pairs and [p for p, _ in pairs] == list(ref_mods) and sorted(q for _, q in pairs) == sorted(other_mods)
    for ref_path, path in pairs:
        ref, mod, name = ref_mods[ref_path], other_mods[path], path
        assert type(mod) is type(ref) and mod.extra_repr() == ref.extra_repr()
        for array in ARRAYS:
            a, b = getattr(ref, array), getattr(mod, array)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), f"{name}.{array}"


def assert_matches_dense(packed: nn.Module, dense: nn.Module, x: torch.Tensor) -> None:
    """Packed output against the dense model: float32 sums in another order, so 1e-5 relative."""
    with torch.no_grad():
        want, got = dense(x), packed(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("mode", ["csr", "bsr"])
def test_pt2_mlp_packs_like_the_module_graph(mode, tmp_path):
    torch.manual_seed(0)
    model = sparsify(Mlp(), 0.9)
    x = torch.randn(3, 256)
    modules = pack_sparse(module_graph(model), x, mode=mode)
    program = pt2_graph(model, x, tmp_path / "mlp.pt2")
    assert "aten.linear.default" in call_targets(program)
    aten = pack_sparse(program, x, mode=mode)
    assert [l.chosen.startswith(mode) for l in aten.record.layers] == [True, True, False]
    assert {l.form for l in aten.record.layers} == {"call"} and {l.form for l in modules.record.layers} == {"module"}
    assert_same_packing(modules, aten)
    # the packed calls are gone with their dense weights; the dense head stays an ATen call
    assert call_targets(aten.gm) & {"aten.linear.default"} and "fc1.weight" not in aten.gm.state_dict()
    assert sum(n.op == "call_function" and "linear" in str(n.target) for n in aten.gm.graph.nodes) == 1
    assert_matches_dense(aten.gm, model, x)
    assert_matches_dense(aten.gm, model, 5 * torch.randn(7, 256))     # another batch, larger values
    torch.testing.assert_close(aten.gm(x), modules.gm(x), rtol=0, atol=0)   # the same op on the same arrays
    assert aten.record.bytes_saved() == modules.record.bytes_saved() > 0


@pytest.mark.parametrize("form", ["functional", "aten.conv2d", "aten.convolution"])
def test_conv_net_packs_alike_in_every_form(form, tmp_path):
    torch.manual_seed(1)
    model = sparsify(ConvNet(), 0.85)
    x = torch.randn(2, 3, 16, 16)
    modules = pack_sparse(module_graph(model), x, mode="csr")
    assert [l.chosen for l in modules.record.layers] == ["csr", "csr", "csr", "csr", "dense"]
    if form == "functional":
        gm = module_graph(FunctionalConvNet(model))
        expected = "<built-in method conv2d"
    else:
        gm = pt2_graph(model, x, tmp_path / "conv.pt2", core_aten=form == "aten.convolution")
        expected = f"{form}.default"
    assert any(t.startswith(expected) for t in call_targets(gm)), call_targets(gm)
    packed = pack_sparse(gm, x, mode="csr")
    assert_matches_dense(packed.gm, model, x)
    assert_matches_dense(packed.gm, model, 3 * torch.randn(1, 3, 16, 16))
    if form == "functional":  # parameters at the root: layers are named by their weights, packed beside them
        assert [(l.name, l.module) for l in packed.record.layers] == [
            ("c1_w", "c1_w_packed"), ("c2_w", "c2_w_packed"), ("c3_w", "c3_w_packed"), ("c4_w", "c4_w_packed"),
            ("fc_w", None)]
        assert "c1_w" not in packed.gm.state_dict() and "fc_w" in packed.gm.state_dict()
        assert_same_packing(modules, packed)
    elif form == "aten.conv2d":  # a .pt2 keeps the modules' names: the packed modules are where they are there
        assert [(l.name, l.module) for l in packed.record.layers] == [
            (l.name, l.module) for l in modules.record.layers]
        assert_same_packing(modules, packed)
    else:  # core ATen: the linear head is aten.addmm(bias, x, aten.permute(w)), not a linear layer
        assert [(l.name, l.module) for l in packed.record.layers] == [
            (l.name, l.module) for l in modules.record.layers if l.kind == "conv2d"]
        assert "aten.addmm.default" in call_targets(packed.gm)
        assert_same_packing(modules, packed, kinds=("conv2d",))


def test_auto_mode_measures_a_call_as_the_layer_it_is(tmp_path):
    """The timer gets, for an ATen call, an nn.Linear / nn.Conv2d with the call's weights and
    settings: the same layer it gets from the module graph; so the choices are the same too."""
    torch.manual_seed(2)
    model = sparsify(ConvNet(), 0.9)
    x = torch.randn(1, 3, 16, 16)
    seen: dict[str, dict[str, tuple]] = {"module": {}, "call": {}}

    def timer_for(form):
        def timer(layers):
            out = {}
            for name, layer, shape, formats in layers:
                with torch.no_grad():
                    y = layer(torch.ones(shape))
                settings = tuple(getattr(layer, a, None) for a in ("stride", "padding", "dilation", "groups"))
                seen[form][name] = (type(layer), tuple(shape), settings, y, sorted(formats))
                # packed wins on the convolutions, dense on the rest: a fixed, known choice
                fast = name.startswith("c")
                out[name] = {"dense": {"median_ms": 1.0}, **{f: {"median_ms": 0.5 if fast else 2.0} for f in formats}}
            return out
        return timer

    modules = pack_sparse(module_graph(model), x, timer=timer_for("module"))
    aten = pack_sparse(pt2_graph(model, x, tmp_path / "conv.pt2"), x, timer=timer_for("call"))
    assert set(seen["call"]) == set(seen["module"]) == {"c1", "c2", "c3", "c4"}
    for name, (kind, shape, settings, y, formats) in seen["module"].items():
        c_kind, c_shape, c_settings, c_y, c_formats = seen["call"][name]
        assert (c_kind, c_shape, c_settings, c_formats) == (kind, shape, settings, formats)
        torch.testing.assert_close(c_y, y, rtol=1e-6, atol=1e-6)
    assert [l.chosen for l in aten.record.layers] == ["csr", "csr", "csr", "csr", "dense"]
    assert_same_packing(modules, aten)


class SharedWeight(nn.Module):
    """One weight read by two calls, one read by a single call (with its holder holding more)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 32))
        self.head = nn.Module()
        self.head.w = nn.Parameter(torch.randn(32, 32))
        self.head.scale = nn.Parameter(torch.ones(32))

    def forward(self, x):
        return F.linear(torch.relu(F.linear(F.linear(x, self.w), self.w)), self.head.w) * self.head.scale


def test_shared_weight_stays_dense_and_a_busy_holder_keeps_its_other_tensors():
    torch.manual_seed(3)
    model = SharedWeight().eval()
    with torch.no_grad():
        model.w[torch.rand(32, 32) < 0.9] = 0
        model.head.w[torch.rand(32, 32) < 0.9] = 0
    x = torch.randn(4, 32)
    res = pack_sparse(module_graph(model), x, mode="csr")
    assert [(l.name, l.chosen, l.module) for l in res.record.layers] == [("head.w", "csr", "head.w_packed")]
    assert res.record.notes and "also read by other nodes" in res.record.notes[0]
    state = res.gm.state_dict()
    assert "w" in state and "head.scale" in state and "head.w" not in state
    assert isinstance(res.gm.head.w_packed, CsrLinear)
    assert_matches_dense(res.gm, model, x)


def test_layer_stats_read_calls_and_modules_alike(tmp_path):
    torch.manual_seed(4)
    model = sparsify(ConvNet(), 0.5)
    x = torch.randn(1, 3, 16, 16)
    by_module = layer_stats(module_graph(model), x)
    by_aten = layer_stats(pt2_graph(model, x, tmp_path / "conv.pt2"), x)
    by_function = layer_stats(module_graph(FunctionalConvNet(model)), x)
    assert [s.name for s in by_module] == ["c1", "c2", "c3", "c4", "fc"]
    assert [s.to_dict() for s in by_aten] == [s.to_dict() for s in by_module]
    strip = lambda s: {**s.to_dict(), "name": None}  # noqa: E731  (functional layers are named by their weights)
    assert [strip(s) for s in by_function] == [strip(s) for s in by_module]


class Mixed(nn.Module):
    """A module layer and a functional layer in one graph."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.w = nn.Parameter(torch.randn(5, 4 * 4 * 4))

    def forward(self, x):
        return F.linear(self.conv(x).flatten(1), self.w)


def test_layer_stats_of_a_mixed_graph_list_both_layers_in_order():
    stats = layer_stats(module_graph(Mixed().eval()), torch.randn(1, 3, 6, 6))
    assert [(s.type, s.macs) for s in stats] == [("Conv2d", 4 * 16 * 27), ("Linear", 5 * 64)]


# --------------------------------------------------------------------------- the CLI on a .pt2

@pytest.fixture(scope="module")
def sparse_mlp_pt2(tmp_path_factory):
    """The issue's network: a 95%-sparse 4096 -> 1024 -> 1024 MLP (and its 10-class head), saved
    as a torch.export program at batch 1."""
    torch.manual_seed(5)
    model = sparsify(Mlp((4096, 1024, 1024, 10)), 0.95)
    path = tmp_path_factory.mktemp("pt2") / "mlp.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 4096),)), str(path))
    return model, path


def _sparse_kernels(library) -> set[str]:
    """The rwdeploy sparse TIR kernels a built TVM library calls (a batch-1 CSR Linear runs as
    the window-ELL kernel on AVX-512 CPUs, `runtime.tvm_window_ell`)."""
    import re

    return {n for n in tvm_build.kernel_names(library) if re.match(r"rw_linear_(?:sparse|window_ell)_", n)}


@pytest.mark.parametrize("mode", ["csr", "auto"])
def test_cli_packs_the_sparse_mlp_pt2(mode, sparse_mlp_pt2, tmp_path, capsys):
    import json

    import numpy as np
    import onnxruntime as ort

    from rwdeploy.cli import main

    model, path = sparse_mlp_pt2
    out = tmp_path / "out"
    assert main(["compile", str(path), "--out", str(out), "--sparse", mode, "--target", "cpu",
                 "--no-measure", "--batch", "1"]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    sparse = report["sparse"]
    assert [(l["name"], l["form"]) for l in sparse["layers"]] == [("fc1", "call"), ("fc2", "call"), ("fc3", "call")]
    if mode == "csr":
        assert [l["chosen"] for l in sparse["layers"]] == ["csr", "csr", "dense"]
    else:  # the choice follows the measurements: a packed format only where it measured faster
        for layer in sparse["layers"][:2]:
            med = layer["measured_ms"]
            best = min(med, key=med.get)
            assert layer["chosen"] == (best if med[best] < med["dense"] * (1 - sparse["noise"]) else "dense")
    if sparse["packed_layers"]:
        files = report["files"]
        assert files["slim_onnx"]["bytes"] <= files["original_onnx"]["bytes"] / 5
        # the slim TVM build runs one rwdeploy sparse kernel per packed layer (CSR and BSR alike)
        assert report["targets"]["cpu"]["builds"][-1]["path"] == "model.cpu.so"
        assert len(_sparse_kernels(out / "model.cpu.so")) == sparse["packed_layers"]
    # ONNX Runtime's output of the slim file against the dense torch model, on a fresh input
    x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = model(x).numpy()
    sess = ort.InferenceSession(str(out / "slim.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_unbatched_conv_call_is_left_dense():
    """F.conv2d takes an unbatched (C, H, W) input; the packed conv does not: it stays dense."""
    w = torch.randn(8, 3, 3, 3)
    w[torch.rand(w.shape) < 0.9] = 0

    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(w)

        def forward(self, x):
            return F.conv2d(x[0], self.w, padding=1)

    x = torch.randn(1, 3, 6, 6)
    res = pack_sparse(module_graph(Unbatched().eval()), x, mode="csr")
    assert res.record.layers == [] and "w" in res.gm.state_dict()
    torch.testing.assert_close(res.gm(x), F.conv2d(x[0], w, padding=1))
