"""edgecut.compile end to end on tiny models: artifact, load, simulate, explain, errors."""
import math
import warnings

import numpy as np
import pytest
import torch

import edgecut
from edgecut import zoo
from edgecut.api import Artifact, RightSizingOffWarning
from edgecut.costmodel.profile import load_profile
from edgecut.errors import ProfileError, UsageError

# A device 20x slower than this machine's profile, so that cutting pays at some bandwidths.
EDGE = load_profile("local")
DEVICE = EDGE.scaled(20)


def _compile(name, tmp_path, **kw):
    m = zoo.get(name)
    x = torch.randn(*zoo.default_input_shape(name))
    kw = {"target": "local", "edge": "local", "deadline": 0.05, "exits": None, "profile": DEVICE,
          "edge_profile": EDGE, "out_dir": tmp_path / name, "progress": False, **kw}
    return m, x, edgecut.compile(m, x, **kw)


@pytest.mark.parametrize("name", ["tiny_chain", "tiny_dag"])
def test_compile_simulate_equals_eager_at_every_plan(name, tmp_path):
    m, x, art = _compile(name, tmp_path)
    want = m(x).detach().numpy()
    scale = float(np.abs(want).max())
    seen = set()
    for bw in art.table.bounds:
        sim = art.simulate(x, bandwidth=bw)
        assert sim.plan.id == art.plan(bw).id
        assert np.abs(sim.output - want).max() <= 1e-4 * scale
        if sim.plan.cut.device_only:
            assert sim.transfer_s == 0 and sim.sent_bytes == 0
        else:
            assert sim.sent_bytes == sum(art.manifest.tensors[c].shape and
                                         int(np.prod(art.manifest.tensors[c].shape)) * 4
                                         for c in art.manifest.route(sim.plan.id).crossing)
            assert sim.transfer_s > 8 * sim.sent_bytes / bw
        seen.add(sim.plan.id)
    assert len(seen) == len(art.table.plans)


def test_slow_link_keeps_work_on_device_fast_link_moves_it(tmp_path):
    _, _, art = _compile("tiny_chain", tmp_path, deadline=math.inf)
    slow, fast = art.plan(50e3), art.plan(1e9)
    assert slow.cut.device_only
    assert not fast.cut.device_only
    assert fast.latency_s < slow.latency_s


def test_save_open_explain(tmp_path):
    _, x, art = _compile("tiny_dag", tmp_path, bandwidth="2mbit")
    saved = art.save(tmp_path / "saved")
    again = Artifact.open(saved)
    assert again.plan().id == art.plan("2mbit").id
    phases = again.info["compile_s"]           # where compile spent its time, kept in the manifest
    assert list(phases) == ["trace", "plan", "build", "table"] and all(v >= 0 for v in phases.values())
    assert phases["build"] > 0
    png = again.explain(tmp_path / "plan.png")
    data = open(png, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert "bandwidth from" in again.report()


def test_infeasible_deadline_still_compiles_and_says_so(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, art = _compile("tiny_chain", tmp_path, deadline=1e-7)
    assert not any(p.feasible for p in art.table.plans)
    assert all(p.shortfall_s > 0 for p in art.table.plans)
    assert any("deadline" in str(w.message).lower() for w in caught)
    assert "NO (+" in art.report()


def test_exits_without_data_warn_right_sizing_off(tmp_path):
    with pytest.warns(RightSizingOffWarning, match="right-sizing is off"):
        _, _, art = _compile("tiny_chain", tmp_path, exits="auto")
    assert len(art.manifest.exits) == 1


def test_unknown_target_lists_known(tmp_path):
    with pytest.raises(UsageError, match="known targets: .*pi4"):
        _compile("tiny_chain", tmp_path, target="pi9")


def test_uncalibrated_profile_is_refused_then_allowed(tmp_path):
    with pytest.raises(ProfileError, match="uncalibrated"):
        _compile("tiny_chain", tmp_path, target="pi4", profile=None)
    with pytest.warns(UserWarning, match="UNCALIBRATED"):
        _, _, art = _compile("tiny_chain", tmp_path, target="pi4", profile=None, allow_uncalibrated=True)
    assert "UNCALIBRATED" in art.report()
    assert art.manifest.targets["device"]["arch"] == "aarch64"


def test_compile_with_exits_on_data_and_recompile_without_training(tmp_path):
    from edgecut.data import synthetic

    m = zoo.get("tiny_chain")
    x = torch.randn(1, 3, 16, 16)
    data = synthetic((3, 16, 16), n=96, seed=1), synthetic((3, 16, 16), n=64, seed=2)
    art = edgecut.compile(m, x, target="local", edge="local", deadline=0.05, exits="auto", data=data,
                          profile=DEVICE, edge_profile=EDGE, epochs=1, num_exits=2, out_dir=tmp_path / "a",
                          progress=False)
    assert len(art.manifest.exits) == 2
    assert all(0 <= e.accuracy <= 1 for e in art.manifest.exits)
    again = edgecut.compile(art.gm, x, target="local", edge="local", deadline=0.5, profile=DEVICE,
                            edge_profile=EDGE, out_dir=tmp_path / "b", progress=False)
    assert [e.accuracy for e in again.manifest.exits] == [e.accuracy for e in art.manifest.exits]
    assert again.info["deadline"] == 0.5
    with torch.no_grad():
        want = art.gm(x)
    sim = again.simulate(x, bandwidth=1e9, early_exit=False)
    assert np.allclose(sim.output, want[sim.exit_id].numpy(), atol=1e-4 * float(want[sim.exit_id].abs().max()))


def test_cli_compile_then_explain(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "art"
    r = subprocess.run([sys.executable, "-m", "edgecut", "compile", "edgecut.zoo:tiny_dag", "--target", "local",
                        "--edge", "local", "--deadline", "20ms", "--bandwidth", "1.5Mbps", "--rtt", "5ms",
                        "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "bandwidth from" in r.stdout and (out / "manifest.json").exists()
    png = tmp_path / "p.png"
    r = subprocess.run([sys.executable, "-m", "edgecut", "explain", str(out), "-o", str(png), "--bandwidth",
                        "500kbit"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"
    r = subprocess.run([sys.executable, "-m", "edgecut", "compile", "edgecut.zoo:tiny_dag", "--target", "pi9",
                        "-o", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "known targets" in r.stderr and "Traceback" not in r.stderr


def test_predictions_include_what_each_library_call_costs(tmp_path):
    """Every candidate's device and edge seconds are its nodes' plus one Profile.segment_seconds
    per library call on that side; the final table is chosen over those predictions."""
    from dataclasses import replace

    from edgecut.frontend import meta

    device = replace(DEVICE, segment={"intercept": 2e-4, "s_per_elem": 1e-9})    # x20: 4 ms a call
    _, _, art = _compile("tiny_chain", tmp_path, deadline=math.inf, profile=device)
    man, nodes = art.manifest, {n.name: n for n in art.gm.graph.nodes}
    segs = {s.name: s for s in man.segments}

    def expect(names, key, prof):
        total = 0.0
        for name in names:
            s = segs[name]
            total += sum(nodes[n].meta[key] for n in s.nodes)
            total += prof.segment_seconds(*(sum(math.prod(man.tensors[t].shape) for t in ts)
                                            for ts in (s.inputs, s.outputs)))
        return total

    assert len(man.candidates) > len(art.table.plans)
    for p in man.candidates:
        r = man.route(p.id)
        assert p.device_s == pytest.approx(expect([*r.device, *(h for _, _, hs in r.checks for h in hs)],
                                                  meta.DEVICE_S, device))
        assert p.edge_s == pytest.approx(expect(r.edge, meta.EDGE_S, EDGE))
        assert len(r.device) <= 1 and len(r.edge) <= 1           # no exits: one call a side
        if r.device:
            assert p.device_s >= device.segment_seconds(0, 0) >= 4e-3
    cands = {p.id: p for p in man.candidates}
    for p in art.table.plans:
        assert (p.device_s, p.edge_s) == (cands[p.id].device_s, cands[p.id].edge_s)
    assert art.manifest.fallback.id in cands
