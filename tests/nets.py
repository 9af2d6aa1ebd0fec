"""Small test-only networks, one per channel-coupling pattern the passes must handle.

`TEST_NETS = {name: (constructor, input_shape)}`; every network is tiny so tests stay fast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class Chain(nn.Module):
    """conv-BN-ReLU chain with a padded 3x3 conv after every pruned layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = cbr(3, 8), cbr(8, 12), cbr(12, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.c(self.b(self.a(x))).mean((2, 3)))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.b1, self.b2 = cbr(8, 6, 1), cbr(8, 10)
        self.bn = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu(self.bn(torch.cat([self.b1(x), self.b2(x)], dim=1)))
        return self.fc(F.adaptive_avg_pool2d(self.conv(y), 1).flatten(1))


class SplitChunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 12)
        self.c1, self.c2 = cbr(6, 6), cbr(6, 6)
        self.c3 = cbr(12, 8)
        self.c4 = nn.Conv2d(3, 4, 3, padding=1)
        self.c5 = nn.Conv2d(5, 4, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)
        y = self.c3(torch.cat([self.c1(a), self.c2(b)], 1))
        p, q = torch.split(y, [3, 5], dim=1)
        z = torch.cat([self.c4(p), self.c5(q), y[:, 2:6], y[:, -4:]], 1)
        return self.fc(z.amax((2, 3)))


class GroupedDepthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.grouped = cbr(16, 16, 3, groups=4)
        self.dw = cbr(16, 16, 3, groups=16)
        self.dw2 = nn.Conv2d(16, 32, 3, padding=1, groups=16)  # channel multiplier 2
        self.pw = cbr(32, 8, 1)
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.out(self.pw(self.dw2(self.dw(self.grouped(self.stem(x))))))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


class Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(3, 8)
        self.c = cbr(16, 8)

    def forward(self, x):
        return self.c(channel_shuffle(torch.cat([self.a(x), self.b(x)], 1), 2))


class Ghost(nn.Module):
    """GhostNet's module: primary features, cheap depthwise features of them, both kept."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.primary = cbr(8, 8, 1)
        self.cheap = cbr(8, 8, 3, groups=8)
        self.out = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        y = self.primary(self.stem(x))
        return self.out(torch.cat([y, self.cheap(y)], 1))


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = cbr(3, 6), cbr(6, 8, stride=2)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = self.c2(self.c1(x))
        x = x.view(-1, 8 * 4 * 4)  # a literal size the pass must rewrite
        return self.fc2(F.relu(self.fc1(x)))


class MultiResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.b1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.b2 = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.b3 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.gate = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu(x + self.b1(x) + self.b2(x) - self.b3(x))
        g = torch.sigmoid(self.gate(F.adaptive_avg_pool2d(y, 1)))
        return self.out(y * g + 0.5 * y)


class Attention(nn.Module):
    """Explicit multi-head attention: q/k/v Linear, split into heads, out projection."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        k = self.k(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        v = self.v(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        y = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(y)


class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, 4)
        self.attn = Attention(16, 4)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return self.head(x.mean(1))


class Norms(nn.Module):
    """GroupNorm (whole groups), PReLU, ConvTranspose2d, Conv1d + BatchNorm1d, layer scale."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.act = nn.PReLU(16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.c1d = nn.Conv1d(8, 6, 3, padding=1)
        self.bn1d = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.up(self.act(self.gn(self.c1(x))))
        x = F.hardswish(self.c2(x)) * self.scale
        x = x.flatten(2)
        x = F.silu(self.bn1d(self.c1d(x)))
        return self.fc(x.mean(-1))


class UnknownOp(nn.Module):
    """An op without a spec (atan) is not understood: it must pin, not break."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = cbr(3, 8), cbr(8, 8), cbr(8, 8)
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        x = self.a(x)
        y = torch.atan(self.b(x))
        return self.out(self.c(y))


class SharedConv(nn.Module):
    """One conv applied twice (weight sharing): channel i is one channel at both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 8)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.b = cbr(8, 8)
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.shared(F.relu(self.shared(self.a(x))))
        return self.out(self.b(y))


class TorchMultiheadAttention(nn.Module):
    """nn.MultiheadAttention is a leaf the analysis does not look into: it pins, the MLP shrinks."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, 4)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.mha(x, x, x, need_weights=False)[0]
        return self.head((x + self.mlp(x)).mean(1))


class InstanceNorms(nn.Module):
    """Affine InstanceNorm as a module (with and without running statistics) and as
    F.instance_norm; a .pt2 holds aten.instance_norm for all three."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 6, 1)
        self.in1 = nn.InstanceNorm2d(8, affine=True)
        self.in2 = nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.gamma, self.beta = nn.Parameter(torch.rand(6) + 0.5), nn.Parameter(torch.randn(6) * 0.5)
        self.out = nn.Conv2d(6, 4, 3, padding=1)
        with torch.no_grad():  # trained-looking: removed channels carry non-zero constants
            for norm in (self.in1, self.in2):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0, 0.5)
            self.in2.running_mean.normal_(0, 0.5)
            self.in2.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = F.relu(self.in1(self.a(x)))
        x = F.relu(self.in2(self.b(x)))
        x = F.instance_norm(self.c(x), weight=self.gamma, bias=self.beta)
        return self.out(F.silu(x))


class AdaptiveMaxPool(nn.Module):
    """Adaptive max pooling between pruned layers; a .pt2 holds aten.adaptive_max_pool2d,
    which returns (values, indices)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(8, 8)
        self.pool = nn.AdaptiveMaxPool2d(6)
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        x = self.b(self.pool(self.a(x)))
        return self.out(F.adaptive_max_pool2d(x, 4))


class TensorIndex(nn.Module):
    """Rows gathered by a tensor index (`y[:, :, rows]`, as Swin-V2's relative-position tables
    do): the indexed value's channels stay, the layers after it still lose theirs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(8, 8)
        self.out = nn.Conv2d(8, 4, 3, padding=1)
        self.register_buffer("rows", torch.tensor([3, 1, 0, 2, 7, 5, 4, 6, 11, 9, 8, 10, 15, 13, 12, 14]))

    def forward(self, x):
        return self.out(self.b(self.a(x)[:, :, self.rows]))


class InPlaceResize(nn.Module):
    """In-place elementwise ops and bicubic resizing between pruned layers; a .pt2 keeps them as
    aten.div_, aten.dropout_, aten.sub_, aten.sigmoid_ and aten.upsample_bicubic2d (CrossViT,
    ConViT, TNT)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(8, 8)
        self.drop = nn.Dropout(0.1, inplace=True)
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        y.div_(2.0)
        y = self.drop(F.interpolate(y, scale_factor=2, mode="bicubic"))
        y.sub_(0.5)
        return self.out(self.b(y.sigmoid_()))


class RepeatInterleave(nn.Module):
    """Channels repeated in place (`repeat_interleave(2, dim=1)`: channel c becomes 2c, 2c+1, as
    GC-ViT repeats its global queries) and a zeros tensor added (aten.zeros in a .pt2)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(16, 8)
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.a(x).repeat_interleave(2, dim=1)
        y = y + torch.zeros(1, 1, 8, 8, device=x.device)  # constant over channels, varying over H, W
        return self.out(self.b(y))


class GathersAndWindows(nn.Module):
    """Ops real models use that .pt2 graphs spell in ATen: a bias gathered from a table by a
    tensor index along positions (aten.index; Swin-V2's and ViT-relpos's relative position
    biases; an activation's rows gathered the same way, as MaxViT's relative-position MLP output
    is), dropout2d (aten.feature_dropout; BAT), a variance over H and W
    (aten.var; EvoNorm) and windows unfolded along H and W (aten.unfold; HaloNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(8, 8)
        self.table = nn.Parameter(torch.randn(15))  # a bias per relative position
        self.register_buffer("index", torch.tensor([3, 14, 0, 7, 7, 2, 9, 11]))  # a position per column
        self.drop = nn.Dropout2d(0.2)
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.drop(self.a(x)) + self.table[self.index][None, None, None, :]  # varies along W only
        y = y[:, :, self.index.remainder(8)]  # rows gathered by an index tensor (getitem / aten.index)
        y = y / (torch.var(y, (2, 3), False, True) + 1).sqrt()  # (x, dim, unbiased, keepdim)
        y = y.unfold(2, 4, 4).unfold(3, 4, 4).mean(dim=(4, 5))  # 8x8 -> 2x2 windows of 4x4
        return self.out(self.b(y))


class PatchesAsColumns(nn.Module):
    """im2col (`F.unfold` / nn.Unfold / aten.im2col, as T2T-ViT, TNT and VOLO cut patches): a
    padded 2x2 unfold turns channel c into rows 4c..4c+3 of each column, which a Linear over
    the columns reads as features; removed channels' constants meet the padding's zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 8)
        self.unfold = nn.Unfold(kernel_size=2, padding=1, stride=2)
        self.fc = nn.Linear(8 * 4, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, x):
        cols = self.unfold(self.a(x)).transpose(1, 2)  # (N, L, C*4)
        return self.out(torch.relu(self.fc(cols)).mean(dim=1))


class PatchesOfTheInput(nn.Module):
    """TNT's pixel embedding: im2col of the model input itself (its channels are one pinned
    class), then Linear layers over the patch columns."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3 * 16, 12)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        cols = nn.functional.unfold(x, 4, stride=4).transpose(1, 2)  # (N, L, 3*16)
        return self.fc(torch.relu(self.embed(cols))).mean(dim=1)


class OutlookAndMax(nn.Module):
    """VOLO's patterns: windows cut by im2col, weighted per tap and folded back (`F.fold` /
    aten.col2im: a channel's k*k rows add up into it), and a class head that takes the
    maximum over tokens (`max(1)[0]`: (values, indices) along a dim that carries no channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 8)
        self.fold = nn.Fold(output_size=(8, 8), kernel_size=3, padding=1)
        self.b = cbr(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.a(x)
        cols = torch.relu(nn.functional.unfold(y, 3, padding=1) - 0.1)  # (N, 8*9, 64)
        y = self.b(self.fold(cols) / 9)
        tokens = y.flatten(2).transpose(1, 2)  # (N, 64, 8)
        return self.head(tokens.max(1)[0])


class EinsumAttention(Attention):
    """The same attention written with einsum over a [batch, tokens, heads, width] layout
    (MViT-V2, EVA and many research models spell their products this way), plus a term of the
    queries against a position table shared by the heads (MViT-V2's relative positions)."""

    def __init__(self, dim: int = 16, heads: int = 4, tokens: int = 16) -> None:
        super().__init__(dim, heads)
        self.table = nn.Parameter(torch.randn(tokens, dim // heads))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (f(x).reshape(b, n, self.heads, c // self.heads) for f in (self.q, self.k, self.v))
        attn = torch.einsum("bqhd,bkhd->bhqk", q, k) * (c // self.heads) ** -0.5
        attn = attn + torch.einsum("bqhd,kd->bhqk", q, self.table[:n])
        return self.proj(torch.einsum("bhqk,bkhd->bqhd", attn.softmax(dim=-1), v).reshape(b, n, c))


class EinsumAttentionNet(AttentionNet):
    def __init__(self) -> None:
        super().__init__()
        self.attn = EinsumAttention(16, 4)


class SliceWrite(nn.Module):
    """An in-place write into a slice (`y[:, :, 1:, 1:] = ...`: aten.copy_ into a view; MViT-V2
    adds its relative positions to the logits this way): the written positions join the
    classes of what is written."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(3, 8)
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y, z = self.a(x), self.b(x)
        y[:, :, 1:, 1:] = z[:, :, 1:, 1:] * 2
        return self.out(y)


TEST_NETS = {
    "chain": (Chain, (1, 3, 16, 16)),
    "concat": (Concat, (1, 3, 16, 16)),
    "split_chunk": (SplitChunk, (1, 3, 16, 16)),
    "grouped_depthwise": (GroupedDepthwise, (1, 3, 16, 16)),
    "shuffle": (Shuffle, (1, 3, 16, 16)),
    "flatten_linear": (FlattenLinear, (1, 3, 8, 8)),
    "multi_residual": (MultiResidual, (1, 3, 16, 16)),
    "attention": (AttentionNet, (1, 3, 16, 16)),
    "norms": (Norms, (1, 3, 8, 8)),
    "unknown_op": (UnknownOp, (1, 3, 16, 16)),
    "torch_mha": (TorchMultiheadAttention, (1, 3, 16, 16)),
    "shared_conv": (SharedConv, (1, 3, 16, 16)),
    "instance_norm": (InstanceNorms, (1, 3, 8, 8)),
    "adaptive_max_pool": (AdaptiveMaxPool, (1, 3, 16, 16)),
    "ghost": (Ghost, (1, 3, 16, 16)),
    "tensor_index": (TensorIndex, (1, 3, 16, 16)),
    "in_place_resize": (InPlaceResize, (1, 3, 8, 8)),
    "repeat_interleave": (RepeatInterleave, (1, 3, 8, 8)),
    "gathers_and_windows": (GathersAndWindows, (1, 3, 8, 8)),
    "patches_as_columns": (PatchesAsColumns, (1, 3, 8, 8)),
    "patches_of_the_input": (PatchesOfTheInput, (1, 3, 8, 8)),
    "outlook_and_max": (OutlookAndMax, (1, 3, 8, 8)),
    "einsum_attention": (EinsumAttentionNet, (1, 3, 16, 16)),
    "slice_write": (SliceWrite, (1, 3, 8, 8)),
}
