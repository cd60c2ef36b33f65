import torch
import torch.nn.functional as F
from torch import nn


class Mixed(nn.Module):
    """conv+BN+ReLU(inplace), depthwise conv, squeeze-excitation, hardswish, SiLU, a LayerNorm
    after a permute, nn.MultiheadAttention, F.scaled_dot_product_attention, GELU, a residual
    +=, and a branch on a shape through int() that torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.ReLU(inplace=True)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.se_reduce, self.se_expand = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.norm = nn.LayerNorm(16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.qkv = nn.Linear(16, 48)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        z = F.hardswish(self.dw(y))
        s = z.mean((2, 3), keepdim=True)
        z = z * F.hardsigmoid(self.se_expand(F.silu(self.se_reduce(s))))
        if int(z.shape[-1]) > 1:          # torch.fx cannot trace this; torch.export can
            z += y
        t = self.norm(z.permute(0, 2, 3, 1)).flatten(1, 2)        # (B, HW, C)
        t = t + self.mha(t, t, t, need_weights=False)[0]
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        t = t + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        t = t + self.mlp(t)
        return self.head(t.mean(1))
