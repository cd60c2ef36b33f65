"""Calibration on a real TVM artifact: what it times, the file, refusals, the torch-free CLI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from test_e2e import NO_TORCH_CLI

from edgecut.codegen.manifest import load_arrays
from edgecut.errors import ArtifactError
from edgecut.runtime.calibration import (Calibration, calibrate, default_path, ensure_calibration, fingerprint,
                                         quantile)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def art(exit_artifact, tmp_path):
    """A private copy of the shared artifact (calibrations are written beside it)."""
    path, x = exit_artifact
    dst = tmp_path / "art"
    shutil.copytree(path, dst, ignore=shutil.ignore_patterns("calibration-*"))
    return dst


def test_device_and_edge_parts_are_timed_per_plan_under_the_idle_pattern(art):
    slept = []

    def sleep(s):
        slept.append(s)
        time.sleep(s)

    dev = calibrate(art, "device", repeats=2, sleep=sleep)
    assert set(dev.samples) == {"e0/device", "e1/mid", "e1/input"}
    assert all(len(s) == 6 for s in dev.samples.values())           # 2 rounds x 3 idle levels
    assert sorted(set(slept)) == [0.005, 0.02] and len(slept) == 2 * 2 * 3
    # the device part of e1/mid (conv1 .. conv2) does more than e1/input's (nothing)
    assert dev.quantiles("e1/mid")["p50"] > dev.quantiles("e1/input")["p50"]
    edge = calibrate(art, "edge", repeats=1)
    assert set(edge.samples) == {"e1/mid", "e1/input"}              # device-only plans have no edge part
    for pid in edge.samples:
        q = edge.quantiles(pid)
        assert 0 < q["p50"] <= q["p90"] <= q["p99"] < 0.5
    assert edge.machine == fingerprint() and edge.manifest_sha256 == dev.manifest_sha256


def test_quantile_never_reads_past_what_n_samples_say():
    s = [1.0] * 31 + [100.0]
    assert quantile(s, 0.99) == pytest.approx(1.0)          # one outlier in 32 does not move p99
    assert quantile(s + [100.0], 0.99) > 50                 # two do
    assert quantile([2.0], 0.99) == 2.0 and quantile([1.0, 3.0], 0.5) == 2.0 and quantile([1.0, 3.0], 0.99) > 2.9


def test_file_round_trip_refusals_and_redo(art):
    cal = ensure_calibration(_load(art), "device", True, repeats=1)
    path = default_path(_load(art), "device")
    assert path == art / "calibration-device.json" and path.is_file() and cal.path == str(path)
    d = json.loads(path.read_text())
    assert set(d["plans"]["e1/mid"]) >= {"p50", "p90", "p99", "n", "samples"} and d["machine"]["cpu"]
    again = ensure_calibration(_load(art), "device", True)
    assert again.made_at == cal.made_at and again.samples == cal.samples     # loaded, not redone
    assert Calibration.load(path) == cal

    bad = dict(d, manifest_sha256="0" * 64)
    path.write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match="another artifact"):
        ensure_calibration(_load(art), "device", True)

    bad = dict(d, machine=dict(d["machine"], cpu="Cortex-A72", machine="aarch64"))
    path.write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match="another machine.*cpu.*Cortex-A72"):
        ensure_calibration(_load(art), "device", True)
    with pytest.raises(ArtifactError, match="another machine"):
        ensure_calibration(_load(art), "device", Calibration.load(path))

    old = dict(d, made_at=os.stat(art / "manifest.msgpack").st_mtime - 60)
    path.write_text(json.dumps(old))
    redone = ensure_calibration(_load(art), "device", True, repeats=1)
    assert redone.made_at > old["made_at"] and json.loads(path.read_text())["made_at"] == redone.made_at

    path.write_text("{not json")
    with pytest.raises(ArtifactError, match="cannot read calibration"):
        ensure_calibration(_load(art), "device", True)
    with pytest.raises(ArtifactError, match="edge side, not the device"):
        ensure_calibration(_load(art), "device", calibrate(art, "edge", repeats=1))


def test_a_wrapped_part_is_another_runner(art):
    class Emulated:
        calibration_tag = "slow x3"

        def __init__(self, part):
            self._part = part

        def run(self, plan_id, tensors, early_exit=True):
            t = time.perf_counter()
            res = self._part.run(plan_id, tensors, early_exit=early_exit)
            time.sleep(2 * (time.perf_counter() - t))
            return res

        def __getattr__(self, name):
            return getattr(self._part, name)

    emu = Emulated(_load(art))
    cal = ensure_calibration(emu, "device", True, repeats=1)
    assert cal.machine["runner"] == "slow x3" and cal.path.endswith("calibration-device-slow_x3.json")
    with pytest.raises(ArtifactError, match="runner"):
        ensure_calibration(_load(art), "device", cal)


def _edgecut(*args) -> subprocess.CompletedProcess:
    """`edgecut ARGS` with torch unimportable (NO_TORCH_CLI asserts it stayed out)."""
    return subprocess.run([sys.executable, "-c", NO_TORCH_CLI, *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_calibrate_cli_without_torch(art, tmp_path):
    out = tmp_path / "edge.json"
    r = _edgecut("calibrate", art, "--side", "edge", "--repeats", "1", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "e1/mid" in r.stdout and f"saved {out}" in r.stdout and "e0/device" not in r.stdout
    assert Calibration.load(out).side == "edge"
    r = _edgecut("calibrate", art / "nope", "--side", "edge")
    assert r.returncode == 2 and "not an edgecut artifact" in r.stderr


def test_run_calibrates_at_its_first_start_without_torch(art, tmp_path):
    np.save(tmp_path / "x.npy", load_arrays(art / "reference.msgpack")["inputs"]["x"])
    r = _edgecut("run", art, "--input", tmp_path / "x.npy", "--json")
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["where"] == "device", r.stderr[-3000:]
    assert Calibration.load(art / "calibration-device.json").side == "device"


def _load(path):
    from edgecut.codegen.load import load

    return load(path, "device")


def test_a_calibration_that_cannot_be_saved_is_still_used(art, tmp_path, caplog):
    where = tmp_path / "no such dir" / "cal.json"
    cal = ensure_calibration(_load(art), "device", where, repeats=1)
    assert cal.path is None and set(cal.samples) == {"e0/device", "e1/mid", "e1/input"}
    assert "for this run only" in caplog.text and not where.exists()
