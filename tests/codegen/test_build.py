"""build(): numerics of every schedule rule against torch, on small shapes, and the aarch64
cross-build. Speed is measured in bench/codegen.py, never asserted here."""
from __future__ import annotations

import logging
import shutil
import struct

import numpy as np
import pytest
import torch
from torch import nn

from edgecut.codegen.build import build
from edgecut.codegen.schedules import plan_tiles
from vmrun import import_relax, run_built


def _randomize_bn(model):
    """Non-trivial batch-norm statistics, so the folded scale/shift is really exercised."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def _check(model, shape, target="local"):
    model = _randomize_bn(model)
    mod, params = import_relax(model, shape)
    built = build(mod, params["main"], target, tuning_dir=False)
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = run_built(built, x)
    assert out.shape == ref.shape
    scale = max(float(np.abs(ref).max()), 1e-6)
    assert float(np.abs(out - ref).max()) <= 1e-4 * scale, (float(np.abs(out - ref).max()), scale)
    return built


class ConvBnRelu(nn.Module):
    def __init__(self, cin, cout, k, stride=1, groups=1, pad=None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2 if pad is None else pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b = ConvBnRelu(c, c, 3), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.b(self.a(x)) + x)


class Head(nn.Module):
    """adaptive average pool, flatten, dense with an odd number of outputs."""

    def __init__(self, c, n):
        super().__init__()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(c, n)

    def forward(self, x):
        return self.fc(self.pool(x).flatten(1))


CASES = {
    "conv3x3": (nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU()), (1, 8, 12, 12)),
    "conv_stride2_7x7": (nn.Conv2d(3, 16, 7, 2, 3), (1, 3, 20, 20)),
    "conv_odd_size": (nn.Conv2d(16, 48, 3, padding=1), (1, 16, 13, 13)),
    "conv1x1_bn_relu": (ConvBnRelu(24, 40, 1), (1, 24, 7, 7)),
    "conv_11x11_stride4": (nn.Conv2d(3, 16, 11, 4, 2), (1, 3, 31, 31)),
    "depthwise_stride2": (ConvBnRelu(32, 32, 3, stride=2, groups=32), (1, 32, 14, 14)),
    "grouped": (nn.Conv2d(16, 32, 3, padding=1, groups=4), (1, 16, 8, 8)),
    "relu6": (nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6()), (1, 8, 9, 9)),
    "residual": (Residual(16), (1, 16, 10, 10)),
    "maxpool": (nn.Sequential(nn.Conv2d(4, 16, 3), nn.MaxPool2d(3, 2)), (1, 4, 17, 17)),
    "maxpool_padded": (nn.Sequential(nn.MaxPool2d(3, 2, padding=1)), (1, 16, 14, 14)),
    "avgpool": (nn.Sequential(nn.AvgPool2d(2)), (1, 32, 8, 8)),
    "head_dense": (Head(64, 10), (1, 64, 5, 5)),
    "dense_relu_dense": (nn.Sequential(nn.Linear(96, 160), nn.ReLU(), nn.Linear(160, 1000)), (1, 96)),
    "dense_batch3": (nn.Linear(40, 24), (3, 40)),
    "softmax": (nn.Sequential(nn.Linear(20, 30), nn.Softmax(dim=1)), (1, 20)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_numerics_match_torch(case, caplog):
    model, shape = CASES[case]
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="edgecut.codegen.schedules"):
        _check(model, shape)
    assert not [r for r in caplog.records if "unscheduled" in r.getMessage()]


class DepthwiseBlock(nn.Module):
    """MobileNetV2's depthwise stage: 3x3 depthwise conv, batch norm, ReLU6."""

    def __init__(self, c, stride):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False)
        self.bn, self.act = nn.BatchNorm2d(c), nn.ReLU6()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


@pytest.mark.parametrize("channels,stride,size", [
    (16, 1, 9), (24, 2, 12), (48, 1, 7), (96, 2, 11), (144, 1, 8), (40, 1, 5),
])
def test_depthwise_numerics_match_torch(channels, stride, size):
    """Channel counts that give 1, 2, 3 and 9 vectors (and 8 lanes for 24 and 40), odd sizes."""
    torch.manual_seed(0)
    _check(DepthwiseBlock(channels, stride), (1, channels, size, size))


def test_batch_norm_folds_into_the_convolution():
    """conv + batch norm leaves one kernel whose epilogue is an add: the scale is in the weights."""
    from edgecut.codegen.build import prepare

    mod, _ = import_relax(_randomize_bn(nn.Sequential(ConvBnRelu(8, 16, 3), DepthwiseBlock(16, 2))),
                     (1, 8, 10, 10))
    main, _, _ = prepare(mod)
    kernels = [gv.name_hint for gv in main.get_global_vars() if "conv2d" in gv.name_hint]
    assert len(kernels) == 2
    assert not [k for k in kernels if "subtract" in k or "multiply" in k or "divide" in k], kernels


@pytest.mark.parametrize("lanes", [4, 8, 16])
def test_accumulator_tiles_stay_under_1kb(lanes):
    """TVM moves a buffer of 1 KB or more off the stack (a heap workspace per task, out of
    registers): every register block the rule plans stays below it."""
    for width in (7, 13, 14, 28, 56, 112):
        for channels in (16, 24, 32, 64, 96, 144, 160, 576, 960, 1280):
            _, v, nvec, _, reg = plan_tiles([1, width, width, channels], lanes)
            assert reg * nvec * v * 4 < 1024 and reg * nvec <= 24, (width, channels, lanes)
            assert width % reg == 0 and channels % (nvec * v) == 0


def test_weights_are_repacked_once_at_compile_time():
    """A dense layer's weight comes back transposed and tiled; main never transposes it."""
    model = nn.Linear(64, 128)
    built = _check(model, (1, 64))
    shapes = sorted(tuple(p.shape) for p in built.params)
    assert (128,) in shapes                 # the bias, untouched
    packed = [s for s in shapes if len(s) == 3]
    assert packed and np.prod(packed[0]) == 64 * 128 and packed[0][1] == 64


def test_unscheduled_default_still_available():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    mod, params = import_relax(model, (1, 3, 8, 8))
    built = build(mod, params["main"], "local", schedule=False)
    x = np.ones((1, 3, 8, 8), "float32")
    with torch.no_grad():
        np.testing.assert_allclose(run_built(built, x), model(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extents,lanes,expect", [
    ([1, 56, 56, 64], 16, (3, 16, 2, 2, 7)),     # NHWC conv: 7 pixels x 2 vectors (< 1 KB)
    ([1, 56, 56, 144], 16, (3, 16, 3, 2, 4)),    # depthwise 144 channels: 4 pixels x 3 vectors
    ([1, 7, 7, 512], 16, (3, 16, 2, 2, 7)),      # 7 pixels x 2 vectors (3 does not divide 32)
    ([1, 13, 13, 256], 16, (3, 16, 1, 2, 13)),   # prime width: one 13-pixel row
    ([1, 4096], 16, (1, 16, 8, -1, 1)),          # dense, batch 1: 8 vectors of outputs
    ([1, 1000], 16, (1, 8, 5, -1, 1)),           # 1000 = 8 x 125: 5 AVX2-width vectors
    ([1, 56, 56, 64], 4, (3, 4, 4, 2, 4)),       # NEON: 4 lanes, 4 x 4 accumulators
    ([1, 1, 1, 1], 16, (-1, 1, 1, -1, 1)),       # nothing to vectorize
])
def test_plan_tiles(extents, lanes, expect):
    assert plan_tiles(extents, lanes) == expect


def test_aarch64_cross_build_uses_neon(tmp_path):
    """The same schedules build for the Pi 4 (NEON, 4 lanes) into an aarch64 library that holds
    code only: the weights come back as arrays, not inside the .so."""
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("needs gcc-aarch64-linux-gnu")
    model = _randomize_bn(nn.Sequential(ConvBnRelu(3, 16, 3), nn.MaxPool2d(2), nn.Flatten(),
                                        nn.Linear(16 * 8 * 8, 32)))
    mod, params = import_relax(model, (1, 3, 16, 16))
    built = build(mod, params["main"], "pi4", tuning_dir=False)
    assert built.target.name == "pi4"
    lib = tmp_path / "seg.so"
    built.executable.export_library(str(lib), cc=built.target.cc)
    head = lib.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and struct.unpack("<H", head[18:20])[0] == 183  # EM_AARCH64
    weight_bytes = sum(p.nbytes for p in built.params)
    assert weight_bytes > 64 * 1024 and lib.stat().st_size < 10 * weight_bytes
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump:
        import subprocess

        asm = subprocess.run([objdump, "-d", str(lib)], capture_output=True, text=True).stdout
        assert "fmla\tv" in asm  # NEON fused multiply-add on 128-bit vectors
