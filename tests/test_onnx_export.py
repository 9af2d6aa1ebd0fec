"""ONNX export and ONNX Runtime: round trip against torch, validity, no mutation."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rwdeploy.runtime.onnx_export import (MAX_ORT_IR_VERSION, MIN_OPSET, _copies_out_of_place, copy_into,
                                          export_onnx)
from rwdeploy.runtime.ort_runner import OrtRunner


class SmallNet(nn.Module):
    """conv-BN-ReLU, a residual add, pooling, flatten into Linear: the compile pipeline's ops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = y + self.conv2(y)
        return self.fc(torch.flatten(self.pool(y), 1))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = SmallNet()
    with torch.no_grad():  # non-trivial BN statistics, so a wrong BN export would show
        net.bn1.running_mean.uniform_(-1, 1)
        net.bn1.running_var.uniform_(0.5, 2)
    return net.eval()


def _rel_err(ref: torch.Tensor, got: np.ndarray) -> float:
    return float((ref - torch.from_numpy(got)).abs().max() / ref.abs().max())


@pytest.mark.parametrize("batch", [1, 3])
def test_ort_output_matches_torch(tmp_path, batch):
    net = _net()
    info = export_onnx(net, torch.randn(1, 3, 8, 8), tmp_path / "net.onnx")
    x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch))
    got = OrtRunner(info.path, threads=1).run(x.numpy())
    with torch.no_grad():
        ref = net(x)
    assert got.shape == tuple(ref.shape)  # the batch dimension is dynamic
    assert _rel_err(ref, got) < 1e-5


def test_file_is_valid_for_ort(tmp_path):
    info = export_onnx(_net(), torch.randn(1, 3, 8, 8), tmp_path / "net.onnx")
    model = onnx.load(info.path)
    onnx.checker.check_model(model, full_check=True)
    assert info.opset >= MIN_OPSET
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [info.opset]
    assert model.ir_version <= MAX_ORT_IR_VERSION
    # Weights live inside the file: no external data references, and the size accounts for them.
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    n_params = sum(p.numel() for p in _net().parameters())
    assert info.size_bytes >= 4 * n_params
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]


def test_export_does_not_mutate(tmp_path):
    net = _net().train()  # training mode: an exporter that ran it would update BN statistics
    before = {k: v.clone() for k, v in net.state_dict().items()}
    export_onnx(net, torch.randn(2, 3, 8, 8), tmp_path / "net.onnx")
    assert net.training and net.bn1.training
    after = net.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    # The file holds the eval-mode function (running statistics), as a deployed model must.
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = _net()(x)
    assert _rel_err(ref, OrtRunner(tmp_path / "net.onnx").run(x.numpy())) < 1e-5


def test_export_of_torch_export_module(tmp_path):
    """A module unlifted from torch.export (as `.pt2` files load) refuses train(); it still exports."""
    net = _net()
    program = torch.export.export(net, (torch.randn(2, 3, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    unlifted = program.module()
    export_onnx(unlifted, torch.randn(1, 3, 8, 8), tmp_path / "ep.onnx")
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
    assert _rel_err(ref, OrtRunner(tmp_path / "ep.onnx").run(x.numpy())) < 1e-5


def test_measure_records_runs_and_threads(tmp_path):
    info = export_onnx(_net(), torch.randn(1, 3, 8, 8), tmp_path / "net.onnx")
    runner = OrtRunner(info.path, threads=1)
    stats = runner.measure(np.zeros((2, 3, 8, 8), np.float32), warmup=2, runs=7, min_time_s=0)
    assert stats.n == 7 and stats.warmup == 2
    assert 0 < stats.min_ms <= stats.median_ms <= stats.p90_ms
    assert runner.threads == 1
    assert runner.session.get_session_options().intra_op_num_threads == 1


def test_interleaved_timing_alternates_calls():
    from rwdeploy.runtime.latency import time_interleaved

    calls: list[str] = []
    stats = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                             warmup=2, min_runs=5, max_runs=9, min_time_s=0)
    assert calls == ["a", "b"] * 7  # 2 warm-up rounds, then 5 timed ones, strictly alternating
    assert stats["a"].n == stats["b"].n == 5 and stats["a"].warmup == 2


def test_interleaved_timing_in_turns_of_several_calls():
    from rwdeploy.runtime.latency import time_interleaved

    calls: list[str] = []
    stats = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                             warmup=1, min_runs=5, max_runs=9, min_time_s=0, calls_per_turn=3)
    # 1 warm-up round, then turns of 1 untimed + 3 timed calls until >= 5 timed calls of each
    assert calls == ["a", "b"] + (["a"] * 4 + ["b"] * 4) * 2
    assert stats["a"].n == stats["b"].n == 6



class TokenNet(nn.Module):
    """A class token expanded to the batch and a reshape by the batch size (ViT-style): the
    batch is read from the input, which a `.pt2` program does with `aten.sym_size`."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1)
        halves = tokens.reshape(x.shape[0], tokens.shape[1], 2, 4).sum(2)
        return self.fc(torch.cat([halves, halves], -1)[:, 0])


def test_dynamic_batch_program_exports_for_every_batch(tmp_path):
    """A program exported with a dynamic batch gives a file that runs at other batch sizes
    (the batch size read in forward() must not become the example's constant)."""
    torch.manual_seed(0)
    net = TokenNet().eval()
    program = torch.export.export(net, (torch.randn(2, 3, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    export_onnx(program.module(), torch.randn(1, 3, 8, 8), tmp_path / "tok.onnx")
    for batch in (1, 3):
        x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = net(x)
        got = OrtRunner(tmp_path / "tok.onnx").run(x.numpy())
        assert got.shape == tuple(ref.shape)
        assert _rel_err(ref, got) < 1e-5


class OptionalArgsAttention(nn.Module):
    """timm's ViT signature: forward(x, attn_mask=None, is_causal=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def test_traced_optional_arguments_are_bound_to_their_defaults(tmp_path):
    """fx keeps optional forward() arguments as inputs; the file has the one real input."""
    torch.manual_seed(0)
    net = OptionalArgsAttention().eval()
    gm = torch.fx.symbolic_trace(net)
    assert len([n for n in gm.graph.nodes if n.op == "placeholder"]) == 3
    export_onnx(gm, torch.randn(1, 6, 8), tmp_path / "attn.onnx")
    assert [i.name for i in onnx.load(str(tmp_path / "attn.onnx")).graph.input] == ["input"]
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        ref = net(x)
    assert _rel_err(ref, OrtRunner(tmp_path / "attn.onnx").run(x.numpy())) < 1e-5


class PoolHead(nn.Module):
    """A VGG/AlexNet-style head: adaptive average pooling to a fixed grid before a Linear."""

    def __init__(self, grid: tuple[int | None, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=3)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.fc = nn.LazyLinear(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.conv(x))
        y = y + F.adaptive_avg_pool2d(y, (3, 5)).mean((2, 3), keepdim=True)  # the functional form
        return self.fc(torch.flatten(y, 1))


@pytest.mark.parametrize("side", [3, 21, 30])  # feature maps 1x1 (pool upsamples), 7x7, 10x10
@pytest.mark.parametrize("form", ["fx", "export"])
def test_adaptive_avg_pool_with_output_not_dividing_input(tmp_path, side, form):
    """Output sizes that do not divide the input: the TorchScript exporter refuses them; the
    export writes the pooling windows as two constant matrices (MatMul) instead."""
    torch.manual_seed(side)
    x = torch.randn(1, 3, side, side)
    net = PoolHead((7, 7)).eval()
    net(x)  # materialise the lazy Linear
    module = torch.fx.symbolic_trace(net) if form == "fx" else torch.export.export(net, (x,)).module()
    export_onnx(module, x, tmp_path / "pool.onnx")
    probe = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(probe)
    assert _rel_err(ref, OrtRunner(tmp_path / "pool.onnx").run(probe.numpy())) < 1e-5


def test_adaptive_avg_pool_that_divides_stays_a_pooling_op(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 42, 42)  # 14x14 features -> 7x7 and (None -> 14) x 7
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=3), nn.AdaptiveAvgPool2d((None, 7))).eval()
    export_onnx(torch.fx.symbolic_trace(net), x, tmp_path / "pool.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "pool.onnx")).graph.node}
    assert "AveragePool" in ops and "MatMul" not in ops
    with torch.no_grad():
        ref = net(x)
    assert _rel_err(ref, OrtRunner(tmp_path / "pool.onnx").run(x.numpy())) < 1e-5


class FoldNet(nn.Module):
    """Outlook-attention style: unfold, mix, fold back (VOLO); fold is aten::col2im, which the
    TorchScript exporter refuses below opset 18."""

    def __init__(self, kernel: int, stride: int, padding: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.mix = nn.Conv1d(4 * kernel * kernel, 4 * kernel * kernel, 1)
        self.k, self.s, self.p, self.d = kernel, stride, padding, dilation
        self.fold_module = nn.Fold(output_size=(13, 11), kernel_size=kernel, stride=stride, padding=padding,
                                   dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        cols = self.mix(F.unfold(y, self.k, dilation=self.d, padding=self.p, stride=self.s))
        z = F.fold(cols, y.shape[-2:], self.k, dilation=self.d, padding=self.p, stride=self.s)
        return z + self.fold_module(cols)


@pytest.mark.parametrize("geometry", [(3, 2, 1, 1), (3, 1, 1, 1), (2, 2, 0, 1), (3, 2, 2, 2)])
@pytest.mark.parametrize("form", ["fx", "export"])
def test_fold_exports_as_a_transposed_convolution(tmp_path, geometry, form):
    """F.fold / nn.Fold / aten.col2im: written as a grouped ConvTranspose with a one-hot kernel."""
    torch.manual_seed(0)
    ops, err = _export_in_form(FoldNet(*geometry).eval(), torch.randn(1, 3, 13, 11), form, tmp_path, probe_batch=2)
    assert "ConvTranspose" in ops and "Col2Im" not in ops
    assert err < 1e-5


def _export_in_form(net: nn.Module, x: torch.Tensor, form: str, folder, *, probe_batch: int) -> tuple[set[str], float]:
    """Export `net` as a traced module ("fx") or a torch.export program ("export"); the ONNX ops
    and ORT's relative error against torch on a fresh input of `probe_batch` items."""
    module = torch.fx.symbolic_trace(net) if form == "fx" else torch.export.export(net, (x,)).module()
    export_onnx(module, x, folder / "m.onnx")
    probe = torch.randn((probe_batch, *x.shape[1:]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(probe)
    ops = {n.op_type for n in onnx.load(str(folder / "m.onnx")).graph.node}
    return ops, _rel_err(ref, OrtRunner(folder / "m.onnx").run(probe.numpy()))


class BlockedWindows(nn.Module):
    """HaloNet-style blocked windows: `Tensor.unfold` twice over H and W of a padded map, which
    the TorchScript exporter cannot size in an ATen graph ("input size not accessible")."""

    def __init__(self, size: int, step: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.size, self.step = size, step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pad(self.conv(x), [2, 2, 2, 2])
        windows = y.unfold(2, self.size, self.step).unfold(3, self.size, self.step)
        return windows.flatten(1)


@pytest.mark.parametrize("window", [(4, 4), (6, 3), (5, 2)])
@pytest.mark.parametrize("form", ["fx", "export"])
def test_unfold_exports_as_slices(tmp_path, window, form):
    torch.manual_seed(0)
    batch = 2 if form == "fx" else 1  # a program exported at batch 1 keeps that batch in its reshape
    _, err = _export_in_form(BlockedWindows(*window).eval(), torch.randn(1, 3, 12, 12), form, tmp_path,
                             probe_batch=batch)
    assert err < 1e-6


class RelPosAttention(nn.Module):
    """timm's MViTv2 `cal_rel_pos_type`: relative positions written into the attention logits in
    place (`attn[:, :, i:, j:] = ...`), which torch.export keeps as `copy_` into a slice."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(6, 18)
        self.rel_h, self.rel_w = nn.Parameter(torch.randn(3, 6)), nn.Parameter(torch.randn(3, 6))
        self.register_buffer("idx", torch.tensor([[1, 0], [2, 1]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        q, k, v = self.qkv(x).reshape(b, 4, 3, 1, 6).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * 0.4) @ k.transpose(-2, -1)
        r_q = q.reshape(b, 1, 2, 2, 6)
        rel_h = torch.einsum("byhwc,hkc->byhwk", r_q, self.rel_h[self.idx])
        rel_w = torch.einsum("byhwc,wkc->byhwk", r_q, self.rel_w[self.idx])
        attn[:, :, 0:, 0:] = (attn[:, :, 0:, 0:].view(b, -1, 2, 2, 2, 2) + rel_h.unsqueeze(-1)
                              + rel_w.unsqueeze(-2)).view(b, -1, 4, 4)
        return attn.softmax(-1) @ v


class SelectWrite(nn.Module):
    """timm's ConViT `get_rel_indices`: a constant filled column by column (`t[:, :, 2] = ...`),
    kept by torch.export as `copy_` into a select of a zeros tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ind = torch.arange(4).view(1, -1) - torch.arange(4).view(-1, 1)
        rel = torch.zeros(1, 4, 4, 3)
        rel[:, :, :, 2] = (ind ** 2).unsqueeze(0)
        rel[:, :, :, 1] = ind.unsqueeze(0)
        rel[:, :, 1:3, 0] = 5.0
        return self.proj(rel).sum(-1) * x


@pytest.mark.parametrize("net_cls,shape", [(RelPosAttention, (4, 6)), (SelectWrite, (4, 4))])
def test_in_place_writes_of_exported_programs(tmp_path, net_cls, shape):
    """`copy_` into a view of an intermediate tensor (torch.export keeps it) reaches the file:
    the TorchScript exporter lost the write of RelPosAttention at a dynamic batch and misplaced
    that of SelectWrite; export_onnx rewrites them out of place, leaving the caller's graph as it was."""
    torch.manual_seed(0)
    net = net_cls().eval()
    # as timm's .pt2 files are saved (the lost write shows with this batch range, not with min=1)
    program = torch.export.export(net, (torch.randn(2, *shape),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    unlifted = program.module()
    copies = [n.name for n in unlifted.graph.nodes if n.target is torch.ops.aten.copy_.default]
    assert copies
    export_onnx(unlifted, torch.randn(1, *shape), tmp_path / "w.onnx")
    assert [n.name for n in unlifted.graph.nodes if n.target is torch.ops.aten.copy_.default] == copies
    for batch in (1, 3):
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = net(x)
        assert _rel_err(ref, OrtRunner(tmp_path / "w.onnx").run(x.numpy())) < 1e-5


@pytest.mark.parametrize("index,chain", [
    ((slice(None), slice(1, 3)), (("slice", 0, 0, 2**63 - 1), ("slice", 1, 1, 3))),
    ((slice(None), 2), (("slice", 0, 0, None), ("select", 1, 2))),
    ((0, slice(None, -1), -1), (("select", 0, 0), ("slice", 0, None, -1), ("select", 1, -1))),
    ((slice(2, None), 0), (("slice", 0, 2, 2**63 - 1), ("select", 1, 0))),
])
def test_copy_into_equals_the_in_place_write(index, chain):
    base = torch.arange(4 * 5 * 3, dtype=torch.float32).view(4, 5, 3)
    expected = base.clone()
    src = torch.full_like(expected[index], -7.0) - torch.rand(expected[index].shape)
    expected[index] = src
    got = copy_into(base, src, chain)
    assert torch.equal(got, expected)
    assert torch.equal(base, torch.arange(4 * 5 * 3, dtype=torch.float32).view(4, 5, 3))  # out of place


class AliasReadAfterWrite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lin(x)
        v = a[:, 0:2]  # a view taken before the write: it sees the write
        a[:, 1] = 7.0
        return v.sum(-1, keepdim=True) + a


@pytest.mark.parametrize("net_cls,shape,rewritten", [(SelectWrite, (4, 4), 3), (AliasReadAfterWrite, (4,), 0)])
def test_writes_rewritten_only_where_no_alias_reads_them(net_cls, shape, rewritten):
    torch.manual_seed(0)
    net = net_cls().eval()
    gm = torch.export.export(net, (torch.randn(2, *shape),)).module()
    gm = torch.fx.GraphModule(gm, gm.graph)
    assert _copies_out_of_place(gm.graph) == rewritten
    gm.recompile()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), net(x), rtol=1e-6, atol=1e-6)
