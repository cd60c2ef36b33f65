"""Small real modules with the ops issue 16 names (attention, LayerNorm after a permute, SiLU and
squeeze-excitation, hardswish, channel shuffle, grouped convolution, ceil-mode and adaptive pools,
in-place ops), each with the node after which a segment boundary goes (the middle)."""
import torch
import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
    """conv -> bn -> `out += identity` -> ReLU(inplace=True): the ResNet block tail whose recorded
    reference values an in-place op used to overwrite."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        identity = x
        out = self.bn(self.conv(x))
        out += identity
        out = self.relu(out)
        return self.head(out)


class Attention(nn.Module):
    """ViT block: LayerNorm, nn.MultiheadAttention, residual, MLP with GELU."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        h = self.ln1(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        x = x + a
        return x + self.mlp(self.ln2(x))


class PatchAttention(nn.Module):
    """ViT stem + block: a 4x4 stride-4 patch convolution, tokens, the Attention block (a conv and
    nn.MultiheadAttention in one segment: ConvertLayout must take both)."""

    def __init__(self, d=32):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, 4)
        self.block = Attention(d)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.block(t).mean(1))


class PermuteNorm(nn.Module):
    """ConvNeXt block: depthwise 7x7, permute to NHWC, LayerNorm, MLP, permute back, residual."""

    def __init__(self, c=16):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    """EfficientNet MBConv: expand 1x1 + BN + SiLU, depthwise + BN + SiLU, SE (mean, SiLU,
    sigmoid, multiply), project."""

    def __init__(self, c=8, e=32):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e)
        self.dw, self.bn2 = nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e)
        self.reduce, self.grow = nn.Conv2d(e, 4, 1), nn.Conv2d(4, e, 1)
        self.project = nn.Conv2d(e, c, 1)

    def forward(self, x):
        y = F.silu(self.bn1(self.expand(x)))
        y = F.silu(self.bn2(self.dw(y)))
        s = torch.sigmoid(self.grow(F.silu(self.reduce(y.mean((2, 3), keepdim=True)))))
        return x + self.project(y * s)


class HardSwish(nn.Module):
    """MobileNetV3 block: conv + BN + hardswish, SE with hardsigmoid, conv."""

    def __init__(self, c=8):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.act = nn.Hardswish(inplace=True)
        self.fc1, self.fc2 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)
        self.out = nn.Conv2d(16, c, 1)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.out(y * s)


class Shuffle(nn.Module):
    """ShuffleNetV2 unit: split, grouped 1x1 on one half, concat, channel shuffle."""

    def __init__(self, c=16):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(c // 2, c // 2, 1, groups=2), nn.BatchNorm2d(c // 2), nn.ReLU(),
                                    nn.Conv2d(c // 2, c // 2, 3, padding=1, groups=c // 2))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        y = torch.cat((a, self.branch(b)), dim=1)
        n, c, h, w = y.shape
        return y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class Pools(nn.Module):
    """ceil-mode and padded max pools, a ceil-mode average pool, adaptive pools to odd sizes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, groups=2)
        self.p1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.p2 = nn.MaxPool2d(3, 1, padding=1)
        self.p3 = nn.AvgPool2d(2, 2, ceil_mode=True)
        self.ad = nn.AdaptiveAvgPool2d((3, 5))
        self.fc = nn.Linear(8 * 15, 6)

    def forward(self, x):
        y = self.p2(self.p1(torch.relu(self.conv(x))))
        return self.fc(torch.flatten(self.ad(self.p3(y)), 1))


class ShapeBranch(nn.Module):
    """Python control flow on a shape: torch.fx cannot trace it, so `edgecut.trace` falls back to
    torch.export and the graph is ATen-level (conv2d.default, batch_norm.default, weights as
    get_attr); a max pool with ATen's empty stride."""

    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.c(x)))
        if y.shape[-1] % 2 == 0:
            y = F.max_pool2d(y, 2, ceil_mode=True)
        y = self.ln(y.permute(0, 2, 3, 1)).mean((1, 2))
        return self.fc(F.gelu(y))


class InplaceFirst(nn.Module):
    """conv -> bn | SiLU(inplace=True) -> conv: with the boundary after bn, the second segment's
    first op rewrites its input (the ONNX export once rewrote the build's reference array)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.act, self.out = nn.SiLU(inplace=True), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(self.act(self.bn(self.conv(x))))


# name -> (module, input shape, the node after which the middle boundary goes)
CASES = {
    "residual_inplace": (Residual, (1, 8, 10, 10), "add"),
    "attention": (Attention, (1, 10, 32), "add"),
    "patch_attention": (PatchAttention, (1, 3, 16, 16), "add"),
    "permute_layernorm": (PermuteNorm, (1, 16, 9, 9), "permute"),
    "silu_se": (SqueezeExcite, (1, 8, 12, 12), "silu_1"),
    "hardswish": (HardSwish, (1, 8, 12, 12), "act"),
    "channel_shuffle": (Shuffle, (1, 16, 8, 8), "cat"),
    "pools": (Pools, (1, 4, 23, 23), "p1"),
    "inplace_first": (InplaceFirst, (1, 4, 9, 9), "bn"),
    "aten_graph": (ShapeBranch, (1, 3, 10, 10), "max_pool2d"),
}
