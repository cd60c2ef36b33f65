"""Kernel samples from compiled models, leave-one-model-out refits, segment-call overhead."""
import numpy as np
import pytest
import torch
from torch import nn

import edgecut
from edgecut import targets
from edgecut.costmodel import heldout, kernels
from edgecut.costmodel.calibrate import fit_profile
from edgecut.costmodel.microbench import Sample
from edgecut.costmodel.profile import Profile
from edgecut.frontend import meta


def test_layer_of_rebuilds_the_layer_a_kernel_computes():
    conv = kernels.Call("fused_conv2d3_subtract_multiply_add_maximum", ((1, 56, 56, 16), (2, 3, 3, 16, 48),
                        (1, 1, 1, 96), (1, 28, 28, 96)), 1e-4)
    m, shape = kernels.layer_of(conv)
    assert (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.groups) == (16, 96, (3, 3), (2, 2), 1)
    assert shape == (1, 16, 56, 56)
    dw = kernels.Call("fused_conv2d7_subtract", ((1, 56, 56, 144), (3, 3, 3, 1, 48), (1, 1, 1, 144),
                      (1, 56, 56, 144)), 1e-4)
    assert kernels.layer_of(dw)[0].groups == 144
    dense = kernels.Call("fused_matmul_add_prepacked", ((1, 1280), (2, 256, 25, 5, 20), (1000,), (1, 1000)), 1e-4)
    assert (kernels.layer_of(dense)[0].in_features, kernels.layer_of(dense)[0].out_features) == (1280, 1000)
    pool = kernels.Call("adaptive_avg_pool2d1", ((1, 7, 7, 1280), (1, 1, 1, 1280)), 1e-5)
    assert kernels.layer_of(pool)[1] == (1, 1280, 7, 7)
    assert kernels.layer_of(kernels.Call("transpose1", ((1, 3, 8, 8), (1, 8, 8, 3)), 1e-6)) is None
    # epilogue: batch norm + activation + one residual operand of the output's shape
    res = kernels.Call("fused_conv2d_subtract_multiply_add_maximum", ((1, 8, 8, 4), (1, 1, 1, 4, 4), (1, 1, 1, 4),
                       (1, 8, 8, 4), (1, 8, 8, 4)), 1e-5)
    assert kernels._fused_ops(res) == 3


def test_kernel_samples_of_a_real_compiled_model_carry_their_source():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1,
                          groups=8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    import tvm
    from tvm import relax

    from edgecut.costmodel.microbench import compile_module
    built = compile_module(model, [(1, 3, 16, 16)], targets.get("local"))
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    args = [tvm.runtime.tensor(np.ones((1, 3, 16, 16), "float32"))] + [tvm.runtime.tensor(p) for p in built.params]
    calls, whole = kernels.kernel_calls(vm, args, runs=3)
    assert whole > 0 and all(c.seconds > 0 for c in calls)
    samples = kernels.samples_from_calls(calls, "mine", fused_s_per_elem=1e-10)
    assert sorted(s.kind for s in samples) == sorted([meta.CONV, meta.DWCONV, meta.ADAPTIVE_POOL, meta.LINEAR])
    assert {s.source for s in samples} == {"mine"}
    conv = next(s for s in samples if s.kind == meta.CONV)
    gm = edgecut.trace(model, torch.randn(1, 3, 16, 16))
    from edgecut.costmodel.features import work_features
    want = work_features(next(n for n in gm.graph.nodes if n.meta[meta.KIND] == meta.CONV))
    assert {k: v for k, v in conv.work.items() if k != "params"} == {k: v for k, v in want.items() if k != "params"}
    assert conv.work["params"] == want["params"] - 8   # the bias is not told apart from the epilogue


def _samples(source, scale, n=30, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        e = float(rng.uniform(1e3, 1e6))
        out.append(Sample("r", meta.RELU, (e,), {"macs": 0.0, "in_elems": e, "out_elems": e, "params": 0.0},
                          scale * e, source))
    return out


def test_refit_leaves_a_models_own_samples_out():
    samples = _samples("grid", 1e-9) + _samples("slowmodel", 1e-7, seed=1)
    prof = fit_profile(samples, "p", "local")
    prof = Profile(**{**{k: v for k, v in prof.to_dict().items() if k not in ("format", "version")},
                      "samples": [heldout.sample_to_dict(s) for s in samples]})
    work = {"macs": 0.0, "in_elems": 1e5, "out_elems": 1e5, "params": 0.0}
    without = heldout.refit(prof, exclude={"slowmodel"}).predict(meta.RELU, (1e5,), work)
    assert without == pytest.approx(1e-9 * 1e5, rel=0.05)        # only the grid's line is left
    assert heldout.refit(prof, exclude={"grid"}).predict(meta.RELU, (1e5,), work) == pytest.approx(1e-2, rel=0.05)
    back = Profile.from_dict(prof.to_dict())
    assert back.samples == prof.samples and heldout.sample_from_dict(back.samples[-1]) == samples[-1]
    with pytest.raises(ValueError, match="stores no training samples"):
        heldout.refit(fit_profile(samples, "p", "local"), exclude={"grid"})


def test_segment_seconds_and_too_few_samples():
    prof = Profile("p", "local", segment={"intercept": 2e-5, "s_per_elem": 1e-9})
    assert prof.segment_seconds(1000, 1000) == pytest.approx(2e-5 + 2e-6)
    assert prof.scaled(10).segment_seconds(0, 0) == pytest.approx(2e-4)
    few = fit_profile(_samples("grid", 1e-9, n=3), "p", "local")
    assert few.kinds[meta.RELU]["chosen"] == "elems"              # no CV possible: the one-feature line
    assert few.predict(meta.RELU, (1.0,), {"macs": 0.0, "in_elems": 1e7, "out_elems": 1e7, "params": 0.0}) > 0


def test_segment_overhead_is_measured():
    r = kernels.measure_segment_overhead(targets.get("local"), shapes=((1, 4, 8, 8), (1, 16, 32, 32)), repeats=3)
    assert r["intercept"] >= 0 and r["s_per_elem"] >= 0 and len(r["points"]) == 2
    assert 0 < r["intercept"] + r["s_per_elem"] * 2048 < 0.05
