"""Real modules with the ops of issue 16 compile (torch.export import, schedules that never break
a build) and split equals whole: a segment boundary in the middle, the chained output equals
eager within 1e-4 of the output's scale. Real TVM, no mocks."""
import pytest
import torch
from reach_models import CASES
from torch import nn

import edgecut
from edgecut.codegen.check_cuts import check_cuts
from edgecut.errors import UsageError
from edgecut.passes.find_cuts import find_cuts


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from the identity, so a batch norm that is
    imported or folded wrongly shows in the output."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


def traced(name):
    torch.manual_seed(0)
    cls, shape, mid = CASES[name]
    model = randomize_batchnorm(cls())
    x = torch.randn(*shape)
    return model, x, edgecut.trace(model, x), mid


@pytest.mark.parametrize("name", sorted(CASES))
def test_boundary_in_the_middle_equals_eager(name, tmp_path, caplog):
    model, x, gm, mid = traced(name)
    with caplog.at_level("WARNING"):
        res = check_cuts(gm, x, [mid], out_dir=tmp_path)
    assert "ConvertLayout failed" not in caplog.text
    assert set(res.errors) == {f"after:{mid}"} and res.segments >= 2
    assert not res.fallbacks, res.fallbacks              # TVM builds every segment
    assert res.ok, (res.errors, res.failures)
    from edgecut.codegen.manifest import Manifest

    checks = Manifest.read(tmp_path).checks
    assert all(c["tvm_vs_torch"] <= 1e-4 for c in checks.values())


def test_the_frontends_export_fallback_graph_is_aten_level():
    _, _, gm, _ = traced("aten_graph")
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "aten.batch_norm.default" in targets and any(n.op == "get_attr" for n in gm.graph.nodes)


def test_every_find_cuts_candidate_of_a_block(tmp_path):
    from edgecut import costmodel
    from edgecut.passes.annotate_cost import annotate_cost

    _, x, gm, _ = traced("hardswish")
    prof = costmodel.load_profile("local")
    annotate_cost(gm, prof, prof)
    cuts = find_cuts(gm)
    assert len(cuts) >= 4
    res = check_cuts(gm, x, cuts, onnx=False, out_dir=tmp_path)
    assert set(res.errors) == {c.name for c in cuts}
    assert res.ok, res.errors
    from edgecut.codegen.manifest import Manifest

    m = Manifest.read(tmp_path)              # chained: each node in one segment, however many cuts
    built = [n for s in m.segments for n in s.nodes]
    assert len(built) == len(set(built)) and res.segments <= len(cuts) + 1
    assert max(len(r.device) + len(r.edge) for r in m.routes.values()) == res.segments


def test_check_cuts_refuses_what_it_cannot_run():
    _, x, gm, _ = traced("pools")
    with pytest.raises(UsageError, match="no node 'nope'"):
        check_cuts(gm, x, ["nope"])
    with pytest.raises(UsageError, match="does not run here"):
        check_cuts(gm, x, ["p1"], device_target="pi4")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vit_b_16", "swin_t",
                                  "resnet18", "squeezenet1_0", "regnet_x_400mf", "shufflenet_v2_x1_0"])
def test_torchvision_model_split_in_the_middle(name):
    """Issue 16's models (random init, BN settled, 224x224): TVM builds every segment and a
    single-tensor cut in the middle equals eager. Minutes each."""
    import sys
    import types

    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torchvision.models as tv

    from edgecut import costmodel, zoo
    from edgecut.passes.annotate_cost import annotate_cost

    torch.manual_seed(0)
    model = getattr(tv, name)().eval()
    for m in model.modules():            # ViT's zero-initialised head would make the logits all 0
        if isinstance(m, nn.Linear) and not m.weight.detach().abs().sum():
            nn.init.normal_(m.weight, std=0.02)
    x = torch.randn(1, 3, 224, 224)
    zoo.settle_batchnorm(model, x.shape)
    gm = edgecut.trace(model.eval(), x)
    prof = costmodel.load_profile("local")
    annotate_cost(gm, prof, prof)
    cuts = find_cuts(gm)
    res = check_cuts(gm, x, [cuts[len(cuts) // 2]])
    assert not res.fallbacks and res.ok, (res.errors, res.fallbacks, res.failures)


class _StdConv(nn.Module):
    """Weight-standardized convolutions (NF-Nets, timm's ScaledStdConv2d): batch_norm in training
    mode over the weights, a weight-only computation TVM must compile, not refuse."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(8, 3, 3, 3)), nn.Parameter(torch.randn(8, 8, 3, 3))

    @staticmethod
    def std(w):
        return torch.nn.functional.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True,
                                              momentum=0.0, eps=1e-5).reshape_as(w)

    def forward(self, x):
        x = torch.relu(torch.nn.functional.conv2d(x, self.std(self.w1), padding=1))
        return torch.nn.functional.conv2d(x, self.std(self.w2), padding=1).mean((2, 3))


def test_weight_standardization_compiles_with_tvm(tmp_path):
    torch.manual_seed(0)
    model, x = _StdConv().eval(), torch.randn(1, 3, 16, 16)
    gm = edgecut.trace(model, x)
    mid = next(n.name for n in gm.graph.nodes if n.name.startswith("relu"))
    res = check_cuts(gm, x, [mid], out_dir=tmp_path)
    assert not res.fallbacks, res.fallbacks
    assert res.ok, (res.errors, res.failures)


class _ToDevice(nn.Module):
    """`.to(x.device, dtype)` and `float_tensor // 2` (timm's EdgeNeXt, XCiT): aten.to.device, which
    TVM 0.27 has no converter for, and floor_divide, whose constant it makes int32."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        dim_t = torch.arange(4, dtype=torch.float32).reshape(1, 4, 1, 1)
        scale = 2.0 ** (2 * (dim_t // 2) / 4) + torch.div(dim_t, 2, rounding_mode="floor")   # XCiT's
        scale = scale + torch.div(dim_t, 3, rounding_mode="trunc")         # positional encoding
        return (y * scale + torch.ones(1, 4, 1, 1).to(x.device, torch.float32)).mean((2, 3))


def test_to_device_and_float_floor_divide_compile_with_tvm():
    import numpy as np

    from edgecut.codegen.build import build
    from edgecut.codegen.importer import import_segment

    torch.manual_seed(0)
    model, x = _ToDevice().eval(), torch.randn(1, 3, 8, 8)
    gm = torch.fx.symbolic_trace(model)       # keeps the .to(device, dtype) call as it is
    assert any(n.target == "to" for n in gm.graph.nodes)
    mod, params = import_segment(gm, [((1, 3, 8, 8), "float32")], example_inputs=[x.numpy()])
    built = build(mod, params, "local")
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()), *[tvm.runtime.tensor(p) for p in built.params]).numpy()
    np.testing.assert_allclose(out, model(x).detach().numpy(), rtol=1e-5, atol=1e-5)


class _Nearest(nn.Module):
    """Nearest upsampling at scales that are not whole numbers (GhostNetV2's gate: 7 -> 3 -> 7),
    by a scale factor, and nearest-exact: TVM 0.27's resize rounds half-pixel and picks other
    rows than PyTorch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        gate = torch.sigmoid(nn.functional.avg_pool2d(y, 2, 2))
        a = y * nn.functional.interpolate(gate, size=(y.shape[-2], y.shape[-1]), mode="nearest")
        b = nn.functional.interpolate(gate, scale_factor=2.5, mode="nearest")
        c = nn.functional.interpolate(gate, size=(5, 9), mode="nearest-exact")
        return torch.cat([a.flatten(1), b.flatten(1), c.flatten(1)], 1)


def test_nearest_upsampling_at_fractional_scales_equals_eager():
    import numpy as np

    from edgecut.codegen.build import build
    from edgecut.codegen.importer import import_segment

    torch.manual_seed(0)
    model, x = _Nearest().eval(), torch.randn(1, 3, 7, 7)
    gm = edgecut.trace(model, x)
    mod, params = import_segment(gm, [((1, 3, 7, 7), "float32")], example_inputs=[x.numpy()])
    built = build(mod, params, "local")
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()), *[tvm.runtime.tensor(p) for p in built.params]).numpy()
    np.testing.assert_allclose(out, model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
