"""Tiny test-only mirrors of public model families, each keeping its hard channel pattern.

Written here from the papers' block descriptions (no code or weights from elsewhere):
ShuffleNetV2 (channel split + shuffle), RegNet / ResNeXt (grouped convs in residual blocks),
DenseNet (concat feeding BatchNorm), MobileNetV3 (SE with hard-sigmoid, hard-swish),
EfficientNet (SE, depthwise, no stochastic depth at inference), ConvNeXt (7x7 depthwise,
channels-last LayerNorm, layer scale), Res2Net (split into chained branches), Inception
(multi-branch concat), ViT and Swin (attention heads, MLP, windows, relative position bias).
`TEST_NETS = {name: (constructor, input_shape)}`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nets import cbr, channel_shuffle


def bn_conv(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        half = cout // 2
        self.stride = stride
        if stride == 2:
            self.branch1 = nn.Sequential(bn_conv(cin, cin, 3, 2, cin), bn_conv(cin, half), nn.ReLU())
        src = cin if stride == 2 else half
        self.branch2 = nn.Sequential(bn_conv(src, half), nn.ReLU(), bn_conv(half, half, 3, stride, half),
                                     bn_conv(half, half), nn.ReLU())

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.branch2(x2)], 1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.stage = nn.Sequential(ShuffleUnit(8, 16, 2), ShuffleUnit(16, 16, 1), ShuffleUnit(16, 16, 1))
        self.last = cbr(16, 24, 1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc(self.last(self.stage(self.stem(x))).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int, act=nn.ReLU, gate=nn.Sigmoid) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce, self.act = nn.Conv2d(c, r, 1), act()
        self.expand, self.gate = nn.Conv2d(r, c, 1), gate()

    def forward(self, x):
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class GroupedBottleneck(nn.Module):
    """ResNeXt / RegNet block: 1x1, grouped 3x3, (SE), 1x1, residual."""

    def __init__(self, cin: int, cout: int, width: int, groups: int, stride: int, se: bool) -> None:
        super().__init__()
        self.a = nn.Sequential(bn_conv(cin, width), nn.ReLU())
        self.b = nn.Sequential(bn_conv(width, width, 3, stride, groups), nn.ReLU())
        self.se = SqueezeExcite(width, 4) if se else nn.Identity()
        self.c = bn_conv(width, cout)
        self.short = bn_conv(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.c(self.se(self.b(self.a(x)))) + self.short(x))


class GroupedResNet(nn.Module):
    def __init__(self, groups: int, se: bool) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.blocks = nn.Sequential(GroupedBottleneck(16, 32, 16, groups, 2, se),
                                    GroupedBottleneck(32, 32, 16, groups, 1, se))
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(2 * growth), nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv1(F.relu(self.bn1(x)))
        return torch.cat([x, self.conv2(F.relu(self.bn2(y)))], 1)


class DenseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.block1 = nn.Sequential(DenseLayer(8, 4), DenseLayer(12, 4))
        self.trans = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1, bias=False), nn.AvgPool2d(2))
        self.block2 = nn.Sequential(DenseLayer(8, 4), DenseLayer(12, 4))
        self.norm = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.block2(self.trans(self.block1(self.stem(x))))
        return self.fc(F.relu(self.norm(x)).mean((2, 3)))


class InvertedBlock(nn.Module):
    """MobileNetV3 / EfficientNet block: expand, depthwise, SE, project, residual."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int, act, gate) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(bn_conv(cin, hidden), act())
        self.dw = nn.Sequential(bn_conv(hidden, hidden, k, stride, hidden), act())
        self.se = SqueezeExcite(hidden, max(2, hidden // 4), nn.ReLU if gate is nn.Hardsigmoid else nn.SiLU, gate)
        self.project = bn_conv(hidden, cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class MobileLike(nn.Module):
    def __init__(self, act, gate, k: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(bn_conv(3, 8, 3, 2), act())
        self.blocks = nn.Sequential(InvertedBlock(8, 8, 3, k, 1, act, gate), InvertedBlock(8, 12, 3, k, 2, act, gate),
                                    InvertedBlock(12, 12, 3, k, 1, act, gate))
        self.head = nn.Sequential(nn.Conv2d(12, 24, 1), act())
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.head(self.blocks(self.stem(x))), 1).flatten(1))


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pw1, self.act, self.pw2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pw2(self.act(self.pw1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ChannelsFirstLayerNorm(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c, eps=1e-6)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 2, 2), ChannelsFirstLayerNorm(8))
        self.stage1 = ConvNeXtBlock(8)
        self.down = nn.Sequential(ChannelsFirstLayerNorm(8), nn.Conv2d(8, 16, 2, 2))
        self.stage2 = ConvNeXtBlock(16)
        self.norm, self.fc = nn.LayerNorm(16), nn.Linear(16, 5)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(self.norm(x.mean((2, 3))))


class Res2NetBlock(nn.Module):
    def __init__(self, c: int, width: int = 4, scale: int = 4) -> None:
        super().__init__()
        self.width = width
        self.reduce = nn.Sequential(bn_conv(c, width * scale), nn.ReLU())
        self.convs = nn.ModuleList([nn.Sequential(bn_conv(width, width, 3), nn.ReLU()) for _ in range(scale - 1)])
        self.expand = bn_conv(width * scale, c)

    def forward(self, x):
        parts = torch.split(self.reduce(x), self.width, 1)
        outs, y = [parts[0]], None
        for i, conv in enumerate(self.convs):
            y = conv(parts[i + 1] if y is None else parts[i + 1] + y)
            outs.append(y)
        return F.relu(x + self.expand(torch.cat(outs, 1)))


class Res2Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.blocks = nn.Sequential(Res2NetBlock(16), Res2NetBlock(16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class InceptionModule(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b1 = cbr(cin, 6, 1)
        self.b2 = nn.Sequential(cbr(cin, 4, 1), cbr(4, 6, 3))
        self.b3 = nn.Sequential(cbr(cin, 4, 1), cbr(4, 4, 3), cbr(4, 6, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), cbr(cin, 4, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class Inception(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.m1, self.m2 = InceptionModule(8), InceptionModule(22)
        self.fc = nn.Linear(22, 5)

    def forward(self, x):
        x = self.m2(F.max_pool2d(self.m1(self.stem(x)), 2))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class FusedAttention(nn.Module):
    """ViT-style attention: one qkv Linear, heads split by reshape/permute."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, bias=None):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if bias is not None:
            attn = attn + bias
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViT(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            self.blocks.append(nn.ModuleDict({"n1": nn.LayerNorm(dim), "attn": FusedAttention(dim, heads),
                                              "n2": nn.LayerNorm(dim), "mlp": Mlp(dim, 2 * dim)}))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for blk in self.blocks:
            x = x + blk["attn"](blk["n1"](x))
            x = x + blk["mlp"](blk["n2"](x))
        return self.head(self.norm(x)[:, 0])


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.n1, self.attn = nn.LayerNorm(dim), FusedAttention(dim, heads)
        self.n2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 2 * dim)
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.1)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)

    def forward(self, x):  # x: [B, H, W, C], channels last
        b, h, w, c = x.shape
        ws = self.window
        y = torch.roll(self.n1(x), (-self.shift, -self.shift), (1, 2))
        y = y.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        bias = self.table[self.index.view(-1)].view(ws * ws, ws * ws, -1).permute(2, 0, 1)
        y = self.attn(y, bias.unsqueeze(0))
        y = y.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        x = x + torch.roll(y, (self.shift, self.shift), (1, 2))
        return x + self.mlp(self.n2(x))


class Swin(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 2, 2)
        self.blocks = nn.Sequential(SwinBlock(dim, 4, 4, 0), SwinBlock(dim, 4, 4, 2))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 5)

    def forward(self, x):
        x = self.blocks(self.embed(x).permute(0, 2, 3, 1))
        return self.head(self.norm(x.mean((1, 2))))


TEST_NETS = {
    "shufflenet_v2": (ShuffleNetV2, (1, 3, 16, 16)),
    "resnext": (lambda: GroupedResNet(groups=4, se=False), (1, 3, 16, 16)),
    "regnet_y": (lambda: GroupedResNet(groups=2, se=True), (1, 3, 16, 16)),
    "densenet": (DenseNet, (1, 3, 16, 16)),
    "mobilenet_v3": (lambda: MobileLike(nn.Hardswish, nn.Hardsigmoid, 3), (1, 3, 16, 16)),
    "efficientnet": (lambda: MobileLike(nn.SiLU, nn.Sigmoid, 5), (1, 3, 16, 16)),
    "convnext": (ConvNeXt, (1, 3, 16, 16)),
    "res2net": (Res2Net, (1, 3, 16, 16)),
    "inception": (Inception, (1, 3, 16, 16)),
    "vit": (ViT, (1, 3, 16, 16)),
    "swin": (Swin, (1, 3, 16, 16)),
}
