"""Tiny test-only mirrors of public model families, each keeping its hard channel pattern.

Written here from the papers' block descriptions (no code or weights from elsewhere):
ShuffleNetV2 (channel split + shuffle), RegNet / ResNeXt (grouped convs in residual blocks),
DenseNet (concat feeding BatchNorm), MobileNetV3 (SE with hard-sigmoid, hard-swish),
EfficientNet (SE, depthwise, no stochastic depth at inference), ConvNeXt (7x7 depthwise,
channels-last LayerNorm, layer scale), Res2Net (split into chained branches), Inception
(multi-branch concat), ViT and Swin (attention heads, MLP, windows, relative position bias).
The patterns the timm conformance suite exposed (tests/conformance): DeiT (fused attention,
class and distillation tokens), ConvNeXt-V2 (global response norm: spatial norm, mean over
channels, addcmul), ResMLP (affine by addcmul, token mixing), XCiT (cross-covariance attention:
normalize, per-head temperature, fused attention over channels), LeViT (Linear + BatchNorm1d
over flattened tokens, reshape_as; a learned attention bias indexed per head), MobileViT
(unfolding into patches merges batch and channels), NF-Net (weight-standardised convolutions),
PiT (a class token made by a Linear joined to tokens made by a conv), ECA (a gate by
expand_as), Swin's window padding of a channels-last value.
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


def _trained(*params: nn.Parameter) -> None:
    """Zero-initialised gains and shifts get trained-looking values (constants to fold)."""
    with torch.no_grad():
        for p in params:
            p.copy_(torch.rand(p.shape) * 0.8 + 0.2 if p.dim() else torch.tensor(0.7))


class SdpaAttention(nn.Module):
    """Fused attention: qkv Linear, heads by reshape/permute, F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class DeiT(nn.Module):
    """Class + distillation tokens, position table, fused attention, layer scale, two heads."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.cls, self.dist = nn.Parameter(torch.randn(1, 1, dim) * 0.5), nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, 18, dim) * 0.5)
        self.n1, self.attn = nn.LayerNorm(dim), SdpaAttention(dim, heads)
        self.ls = nn.Parameter(torch.rand(dim) + 0.5)
        self.n2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 2 * dim)
        self.norm, self.head, self.head_dist = nn.LayerNorm(dim), nn.Linear(dim, 5), nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.dist.expand(x.shape[0], -1, -1), x], 1) + self.pos
        x = x + self.ls * self.attn(self.n1(x))
        x = self.norm(x + self.mlp(self.n2(x)))
        return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN (channels last): x + beta + gamma * x * N(x), N(x) = ||x||_spatial
    over its mean across channels."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gamma, self.beta = nn.Parameter(torch.zeros(c)), nn.Parameter(torch.zeros(c))
        _trained(self.gamma, self.beta)

    def forward(self, x):
        g = x.norm(p=2, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return x + torch.addcmul(self.beta.view(1, 1, 1, -1), self.gamma.view(1, 1, 1, -1), x * n)


class ConvNeXtV2(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 2, 2), nn.BatchNorm2d(c), nn.ReLU())
        self.dw, self.norm = nn.Conv2d(c, c, 7, padding=3, groups=c), nn.LayerNorm(c)
        self.pw1, self.grn, self.pw2 = nn.Linear(c, 4 * c), GlobalResponseNorm(4 * c), nn.Linear(4 * c, c)
        self.head = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.BatchNorm2d(2 * c), nn.GELU())
        self.fc = nn.Linear(2 * c, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.pw2(self.grn(F.gelu(self.pw1(self.norm(self.dw(x).permute(0, 2, 3, 1))))))
        return self.fc(self.head(x + y.permute(0, 3, 1, 2)).mean((2, 3)))


class Affine(nn.Module):
    """ResMLP's normalisation: alpha * x + beta, by addcmul."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.alpha, self.beta = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        _trained(self.alpha, self.beta)

    def forward(self, x):
        return torch.addcmul(self.beta, self.alpha, x)


class ResMLP(nn.Module):
    """Affine, a Linear mixing tokens (channels on dim 1), a channel MLP, layer scales."""

    def __init__(self, dim: int = 12, tokens: int = 16) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.n1, self.tokens, self.ls1 = Affine(dim), nn.Linear(tokens, tokens), nn.Parameter(torch.rand(dim) + 0.5)
        self.n2, self.mlp, self.ls2 = Affine(dim), Mlp(dim, 3 * dim), nn.Parameter(torch.rand(dim) + 0.5)
        self.norm, self.head = Affine(dim), nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.ls1 * self.tokens(self.n1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.ls2 * self.mlp(self.n2(x))
        return self.head(self.norm(x).mean(1))


class CrossCovarianceAttention(nn.Module):
    """XCiT's attention across channels: q, k normalised over tokens, per-head temperature,
    fused attention whose 'tokens' are the channels of a head."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.temperature = nn.Parameter(torch.rand(heads, 1, 1) + 0.5)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 4, 1).unbind(0)
        q = F.normalize(q, dim=-1) * self.temperature
        y = F.scaled_dot_product_attention(q, F.normalize(k, dim=-1), v, scale=1.0)
        return self.proj(y.permute(0, 3, 1, 2).reshape(b, n, c))


class XCiT(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Conv2d(3, dim, 4, 4), nn.BatchNorm2d(dim))
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.n1, self.xca = nn.LayerNorm(dim), CrossCovarianceAttention(dim, heads)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.gamma * self.xca(self.n1(x))
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        return self.head(self.norm(x)[:, 0])


class LinearNorm(nn.Module):
    """LeViT's Linear + BatchNorm1d over the flattened tokens, back by reshape_as."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTAttention(nn.Module):
    """q, k, v of their own widths split from one LinearNorm; a learned bias per head and
    relative offset, gathered as biases[:, index]; hard-swish before the projection."""

    def __init__(self, dim: int, heads: int, key: int, resolution: int) -> None:
        super().__init__()
        self.heads, self.key, self.val = heads, key, 2 * key
        self.qkv = LinearNorm(dim, heads * (2 * key + self.val))
        self.proj = LinearNorm(heads * self.val, dim)
        points = torch.stack(torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij")).flatten(1)
        offsets = (points[:, :, None] - points[:, None, :]).abs()
        self.biases = nn.Parameter(torch.randn(heads, resolution * resolution) * 0.5)
        self.register_buffer("index", offsets[0] * resolution + offsets[1], persistent=False)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, -1).split([self.key, self.key, self.val], dim=3)
        attn = q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1) * self.key ** -0.5 + self.biases[:, self.index]
        y = (attn.softmax(dim=-1) @ v.permute(0, 2, 1, 3)).transpose(1, 2).reshape(b, n, self.heads * self.val)
        return self.proj(F.hardswish(y))


class LeViT(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Conv2d(3, dim, 4, 4), nn.BatchNorm2d(dim), nn.Hardswish())
        self.attn = LeViTAttention(dim, 4, 4, 4)
        self.mlp = nn.Sequential(LinearNorm(dim, 2 * dim), nn.Hardswish(), LinearNorm(2 * dim, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return self.head(x.mean(1))


class MobileViTBlock(nn.Module):
    """Local conv, 1x1 to the transformer width, unfold into 2x2 patches (a reshape that
    merges batch and channels), attention across patches per pixel, fold, project, fuse."""

    def __init__(self, c: int, d: int) -> None:
        super().__init__()
        self.local, self.to_d = cbr(c, c, 3), nn.Conv2d(c, d, 1, bias=False)
        self.mix = nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d))
        self.attn = SdpaAttention(d, 2)
        self.back, self.fuse = cbr(d, c, 1), cbr(2 * c, c, 3)

    def forward(self, x):
        y = self.to_d(self.local(x))
        b, d, h, w = y.shape
        p = y.reshape(b * d * (h // 2), 2, w // 2, 2).transpose(1, 2)  # unfold
        p = p.reshape(b, d, (h // 2) * (w // 2), 4).transpose(1, 3).reshape(b * 4, -1, d)
        p = p + self.attn(p)
        p = p + self.mix(p)
        p = p.reshape(b, 4, -1, d).transpose(1, 3).reshape(b * d * (h // 2), w // 2, 2, 2)  # fold
        y = p.transpose(1, 2).reshape(b, d, h, w)
        return self.fuse(torch.cat([x, self.back(y)], 1))


class MobileViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = cbr(3, 8, 3, 2), MobileViTBlock(8, 12)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


class ScaledStdConv2d(nn.Conv2d):
    """NF-Net's convolution: the weight standardised per filter over its fan-in, times a
    learned gain, in every forward (a weight computed from parameters)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1) -> None:
        super().__init__(cin, cout, k, stride, k // 2)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0, eps=1e-6)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding)


class NFNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ScaledStdConv2d(3, 8, 3, 2)
        self.a, self.b = ScaledStdConv2d(8, 16, 1), ScaledStdConv2d(16, 16, 3)
        self.c = ScaledStdConv2d(16, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.gelu(self.stem(x))
        x = x + 0.2 * self.c(F.gelu(self.b(F.gelu(self.a(x)))))
        return self.fc(x.mean((2, 3)))


class PiT(nn.Module):
    """Pooling between stages: the tokens by a depthwise conv (multiplier 2, stride 2), the
    class token by a Linear; joined again along the tokens."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 2, 2)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.mlp1 = Mlp(dim, 2 * dim)
        self.pool, self.pool_cls = nn.Conv2d(dim, 2 * dim, 3, 2, 1, groups=dim), nn.Linear(dim, 2 * dim)
        self.attn = SdpaAttention(2 * dim, 2)
        self.head = nn.Linear(2 * dim, 5)

    def forward(self, x):
        x = self.embed(x)
        b, c, h, w = x.shape
        t = torch.cat([self.cls.expand(b, -1, -1), x.flatten(2).transpose(1, 2)], 1)
        t = t + self.mlp1(t)
        cls, x = t[:, :1], t[:, 1:].transpose(1, 2).reshape(b, c, h, w)
        x, cls = self.pool(x), self.pool_cls(cls)
        t = torch.cat([cls, x.flatten(2).transpose(1, 2)], 1)
        t = t + self.attn(t)
        return self.head(t[:, 0])


class EcaNet(nn.Module):
    """ECA gate (a conv across channels of the pooled value: it mixes channels) by expand_as,
    and Swin's window padding of a channels-last value (H, W padded, channels not)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(8, 8)
        self.eca = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.mlp = Mlp(8, 16)
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        x = self.b(self.a(x))
        y = self.eca(x.mean((2, 3)).unsqueeze(1)).transpose(1, 2).unsqueeze(-1)
        x = x * torch.sigmoid(y).expand_as(x)
        y = F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, 1, 0, 1))
        y = self.mlp(y)[:, :-1, :-1].permute(0, 3, 1, 2)
        return self.out(x + y)


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
    "deit": (DeiT, (1, 3, 16, 16)),
    "convnext_v2": (ConvNeXtV2, (1, 3, 16, 16)),
    "resmlp": (ResMLP, (1, 3, 16, 16)),
    "xcit": (XCiT, (1, 3, 16, 16)),
    "levit": (LeViT, (1, 3, 16, 16)),
    "mobilevit": (MobileViT, (1, 3, 16, 16)),
    "nfnet": (NFNet, (1, 3, 16, 16)),
    "pit": (PiT, (1, 3, 16, 16)),
    "eca": (EcaNet, (1, 3, 8, 8)),
}
