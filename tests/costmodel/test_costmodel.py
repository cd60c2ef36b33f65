"""Cost model: features, fitting on synthetic timings, profile files, annotate_cost, refusals."""
import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import edgecut
from edgecut import costmodel
from edgecut.costmodel import paper, regressors
from edgecut.costmodel.calibrate import fit_profile, fused_epilogue
from edgecut.costmodel.features import folded_into_conv, fused_into, work_features
from edgecut.costmodel.microbench import Sample
from edgecut.costmodel.profile import Profile
from edgecut.errors import ProfileError
from edgecut.frontend import meta
from edgecut.passes.annotate_cost import annotate_cost


def nodes(gm):
    return {n.name: n for n in gm.graph.nodes}


def conv_sample(rng, cin, cout, hw, k, s, coef=(2e-7, 3e-6), b=1e-4, noise=0.0):
    """A conv Sample whose 'measured' time follows Edgent's line exactly (plus optional noise)."""
    ho = (hw + 2 * (k // 2) - k) // s + 1
    x1, x2 = cin * hw * hw, (k * k / (s * s)) * cout
    macs = ho * ho * cout * cin * k * k
    work = {"macs": macs, "in_elems": x1, "out_elems": cout * ho * ho, "params": cout * cin * k * k,
            "cin": cin, "cout": cout, "kernel": k * k, "stride": s * s, "hw": ho * ho}
    y = coef[0] * x1 + coef[1] * x2 + b
    return Sample("c", meta.CONV, (float(x1), float(x2)), work, y * (1 + noise * rng.standard_normal()))


def test_features_of_known_layers():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    gm = edgecut.trace(m, torch.randn(1, 3, 16, 16))
    n = nodes(gm)
    w = work_features(n["_0"])
    assert w["macs"] == 8 * 8 * 8 * 3 * 9 and w["in_elems"] == 3 * 16 * 16 and w["out_elems"] == 8 * 8 * 8
    assert (w["cin"], w["cout"], w["kernel"], w["stride"], w["hw"]) == (3, 8, 9, 4, 64)
    assert work_features(n["_4"])["params"] == 512 * 10 + 10
    # TVM fuses bn and relu into the conv; flatten after relu fuses too; the conv and linear do not
    assert [fused_into(n[k]) for k in ("_0", "_1", "_2", "_4")] == [False, True, True, False]


def test_batch_norm_after_a_conv_is_folded_and_free():
    # the build folds it into the conv's weights (codegen.rewrites); after a linear it stays
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                      nn.Linear(8 * 16 * 16, 10), nn.BatchNorm1d(10)).eval()
    gm = edgecut.trace(m, torch.randn(2, 3, 16, 16))
    n = nodes(gm)
    assert [folded_into_conv(n[k]) for k in ("_0", "_1", "_2", "_5")] == [False, True, False, False]
    prof = costmodel.load_profile("local")
    annotate_cost(gm, prof, prof)
    assert n["_1"].meta[meta.DEVICE_S] == 0.0
    assert n["_2"].meta[meta.DEVICE_S] > 0 and n["_5"].meta[meta.DEVICE_S] > 0


def test_fitting_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    samples = [conv_sample(rng, int(rng.choice([3, 16, 64, 128])), int(rng.choice([16, 64, 256])),
                           int(rng.choice([7, 14, 28, 56])), int(rng.choice([1, 3, 5])), int(rng.choice([1, 2])))
               for _ in range(40)]
    prof = fit_profile(samples, "synthetic", "local")
    edgent = prof.kinds["conv"]["models"]["edgent"]
    assert edgent["coef"] == pytest.approx([2e-7, 3e-6], rel=1e-6)
    assert edgent["intercept"] == pytest.approx(1e-4, rel=1e-6)
    assert prof.kinds["conv"]["cv"]["edgent"]["wape"] < 1e-6     # exact line, exact fit out of fold
    assert prof.kinds["conv"]["chosen"] == "edgent"               # CV picks the model that is right


def test_cv_prefers_a_better_model_under_power_law_timings():
    rng = np.random.default_rng(1)
    X = rng.uniform(1e4, 1e8, size=(60, 4))
    y = 3e-10 * X[:, 0] ** 1.1 * np.exp(0.05 * rng.standard_normal(60))
    fit = regressors.fit_kind({"edgent": X[:, 1:3], "work": X}, y)
    assert fit["cv"]["loglinear"]["wape"] < fit["cv"]["edgent"]["wape"]
    assert fit["chosen"] != "edgent"


def test_predictions_never_negative_and_conv_grows_with_macs():
    prof = costmodel.load_profile("pi3-edgent", target="pi3")
    tiny = prof.predict("conv", (10.0, 1.0), {})               # the paper's -9.9 ms intercept
    assert tiny > 0
    sizes = [prof.predict("conv", (c * 32 * 32, 9 * c), {}) for c in (16, 32, 64, 128)]
    assert all(b > a for a, b in zip(sizes, sizes[1:]))
    assert prof.loading_seconds(2_000_000) == pytest.approx((4.49e-6 * 2e6 + 842.136) / 1000)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    samples = [conv_sample(rng, 16, 32, hw, 3, 1, noise=0.1) for hw in range(8, 60, 2)]
    samples += [Sample("r", meta.RELU, (float(e),), {"macs": 0.0, "in_elems": e, "out_elems": e, "params": 0.0,
                       "cin": 1.0, "cout": 1.0, "kernel": 1.0, "stride": 1.0, "hw": 1.0}, 1e-9 * e + 1e-6)
                for e in (1e3, 1e4, 1e5, 1e6)]
    prof = fit_profile(samples, "rt", "local", fused_s_per_elem=1e-10, error_p95=0.12)
    path = prof.save(tmp_path / "p.json")
    assert "pickle" not in path.read_text()
    back = Profile.load(path)
    assert back == prof
    w = samples[3].work
    assert back.predict("conv", samples[3].edgent, w) == prof.predict("conv", samples[3].edgent, w)
    assert back.error_p95 == 0.12


def test_wrong_version_or_target_is_refused(tmp_path):
    d = costmodel.load_profile("pi3-edgent").to_dict()
    d["version"] = 99
    (tmp_path / "v.json").write_text(json.dumps(d))
    with pytest.raises(ProfileError, match="version 99"):
        costmodel.load_profile(tmp_path / "v.json")
    with pytest.raises(ProfileError, match="describes target 'pi3', not 'pi5'"):
        costmodel.load_profile("pi3-edgent", target="pi5")
    with pytest.raises(ProfileError, match="no profile named"):
        costmodel.load_profile("nonesuch")


def test_uncalibrated_profile_refuses_to_plan():
    gm = edgecut.trace(edgecut.zoo.get("tiny_chain"), torch.randn(1, 3, 16, 16))
    with pytest.raises(ProfileError, match="uncalibrated.*edgecut profile.*allow_uncalibrated=True"):
        annotate_cost(gm, "pi4", "pi3-edgent")
    with pytest.warns(UserWarning, match="UNCALIBRATED"):
        annotate_cost(gm, "pi4", "pi3-edgent", allow_uncalibrated=True)
    assert gm.meta[meta.COST]["uncalibrated"] == ["pi4"]


def test_annotate_cost_writes_every_node_and_falls_back_with_a_warning():
    gm = edgecut.trace(edgecut.zoo.get("tiny_dag"), torch.randn(1, 3, 16, 16))
    prof = costmodel.load_profile("pi3-edgent")
    with pytest.warns(UserWarning, match="no regressor for layer kind"):
        annotate_cost(gm, prof, paper.edgent_profile("edge"))
    for n in gm.graph.nodes:
        dev, edge = n.meta[meta.DEVICE_S], n.meta[meta.EDGE_S]
        if n.meta[meta.KIND] in meta.NO_COST_KINDS:
            assert dev == edge == 0.0
        else:
            assert dev > 0 and edge > 0, n.name      # never a silent zero
    total_dev = sum(n.meta[meta.DEVICE_S] for n in gm.graph.nodes)
    total_edge = sum(n.meta[meta.EDGE_S] for n in gm.graph.nodes)
    assert total_dev > total_edge                   # the paper's Pi is slower than its PC


def test_shipped_paper_profiles_match_their_generator():
    for prof in paper.shipped_profiles():   # (json text: NaN fields compare unequal as floats)
        assert json.dumps(costmodel.load_profile(prof.name).to_dict()) == json.dumps(prof.to_dict())
    assert {"local", "pi3-edgent", "pi3", "pi4", "pi5"} <= set(costmodel.shipped())
    assert not costmodel.load_profile("pi5").calibrated and costmodel.load_profile("pi3-edgent").calibrated


def test_fused_epilogue_from_pairs():
    assert fused_epilogue([(1.0, 1.2, 100, 2), (2.0, 2.2, 100, 2)]) == pytest.approx(1e-3)
    assert fused_epilogue([(1.0, 0.9, 100, 2)]) == 0.0        # noise never makes it negative
