"""Segments TVM cannot build run on ONNX Runtime (per segment); backend="onnxruntime" never builds
with TVM. Real TVM, real torch.onnx and onnxruntime; the op TVM lacks is a real one."""
import warnings

import pytest
import torch
from conftest import make_table, three_cuts
from torch import nn

import edgecut
from edgecut.codegen.artifact import build_artifact
from edgecut.codegen.importer import FAIL_IMPORT_ENV
from edgecut.codegen.load import load
from edgecut.codegen.manifest import max_error
from edgecut.errors import CodegenError, CodegenWarning


class Det(nn.Module):
    """conv -> ReLU | determinant of each channel's 8x8 map (aten._linalg_det: no TVM converter,
    no decomposition) -> linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(torch.linalg.det(self.relu(self.conv(x)) * 0.5 + torch.eye(8)))


def chain(path, plan_id, x, backend="tvm"):
    dev, edge = load(path, "device", backend), load(path, "edge", backend)
    res = dev.run(plan_id, {dev.input_names[0]: x})
    return res if res.done else edge.run(plan_id, res.outputs)


@pytest.fixture(scope="module")
def det():
    torch.manual_seed(0)
    model, x = Det().eval(), torch.randn(1, 3, 8, 8)
    gm = edgecut.trace(model, x)
    return model, x, gm, make_table(gm, three_cuts(gm, ["relu"]))


def test_segment_tvm_cannot_import_runs_on_onnxruntime(det, tmp_path):
    model, x, gm, table = det
    with pytest.warns(CodegenWarning, match=r"_linalg_det.* at node 'linalg_det'") as rec:
        m = build_artifact(gm, table, "local", "local", tmp_path, (x,), progress=False)
    assert len([w for w in rec if w.category is CodegenWarning]) == 1
    # every library holding the det runs on ORT; one holding only the conv runs on TVM
    det_segs = [s.name for s in m.segments if "linalg_det" in s.nodes]
    conv_seg = next(s.name for s in m.segments if "conv" in s.nodes and "linalg_det" not in s.nodes)
    assert det_segs and all(lib.backend == "onnxruntime" for lib in m.libraries if lib.segment in det_segs)
    assert {lib.backend for lib in m.libraries if lib.segment == conv_seg} == {"tvm"}
    for seg in det_segs:
        lib = next(lib for lib in m.libraries if lib.segment == seg)
        assert lib.file == m.onnx[seg] and "_linalg_det" in lib.note
        assert not any((tmp_path / side / f"{seg}.so").exists() for side in ("device", "edge"))
        assert "onnx_vs_torch" in m.checks[seg]
    assert any((tmp_path / side / f"{conv_seg}.so").is_file() for side in ("device", "edge"))
    assert "tvm_vs_torch" in m.checks[conv_seg]
    want = model(x).detach().numpy()
    for plan in table.plans:                        # TVM and ORT segments mixed, both sides
        assert max_error(chain(tmp_path, plan.id, x.numpy()).outputs["logits"], want) <= 1e-4


def test_without_onnx_the_error_names_op_and_node(det, tmp_path):
    _, x, gm, table = det
    with pytest.raises(CodegenError, match=r"_linalg_det.*'linalg_det'.*onnx=True"):
        build_artifact(gm, table, "local", "local", tmp_path, (x,), onnx=False, progress=False)


def test_test_hook_forces_the_fallback_for_one_segment(tmp_path, monkeypatch, capsys):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = edgecut.trace(model, x)
    table = make_table(gm, three_cuts(gm, [[n.name for n in gm.graph.nodes][2]]))
    monkeypatch.setenv(FAIL_IMPORT_ENV, "seg1")
    with pytest.warns(CodegenWarning, match=f"segment seg1 .*{FAIL_IMPORT_ENV}"):
        m = build_artifact(gm, table, "local", "local", tmp_path, (x,), progress=False)
    assert {lib.backend for lib in m.libraries if lib.segment == "seg1"} == {"onnxruntime"}
    assert {lib.backend for lib in m.libraries if lib.segment != "seg1"} == {"tvm"}
    from edgecut.api import Artifact

    report = Artifact(tmp_path, m, gm).report()
    assert "segment seg1 runs on ONNX Runtime (" in report and FAIL_IMPORT_ENV in report
    want = model(x).detach().numpy()
    for plan in table.plans:
        assert max_error(chain(tmp_path, plan.id, x.numpy()).outputs["logits"], want) <= 1e-4
    from edgecut.cli import main as cli

    capsys.readouterr()
    assert cli(["check", str(tmp_path)]) == 0           # the mixed artifact checks as built, and says so
    text = capsys.readouterr().out
    assert "on onnxruntime: seg1)" in text and "over" not in text


def test_onnxruntime_backend_never_builds_with_tvm(det, tmp_path):
    model, x, gm, table = det
    with warnings.catch_warnings():
        warnings.simplefilter("error", CodegenWarning)    # nothing "falls back": nothing tried TVM
        m = build_artifact(gm, table, "local", "local", tmp_path, (x,), backend="onnxruntime", progress=False)
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.params"))
    assert m.libraries and {lib.backend for lib in m.libraries} == {"onnxruntime"}
    assert all("tvm_vs_torch" not in c for c in m.checks.values())
    want = model(x).detach().numpy()
    for backend in ("onnxruntime", "tvm"):             # the libraries say onnxruntime either way
        for plan in table.plans:
            got = chain(tmp_path, plan.id, x.numpy(), backend).outputs["logits"]
            assert max_error(got, want) <= 1e-4


def test_a_library_entry_without_note_still_reads():
    from edgecut.codegen.manifest import Library

    old = {"side": "device", "segment": "seg0", "backend": "tvm", "file": "device/seg0.so",
           "params": "device/seg0.params", "target": "local", "tvm_target": "llvm", "arch": "x86_64"}
    lib = Library.from_dict(old)
    assert lib.note == "" and Library.from_dict(lib.to_dict()) == lib


def test_onnxruntime_backend_does_not_even_import_tvm(tmp_path):
    """In a fresh interpreter: trace + build_artifact(backend="onnxruntime") leave TVM unimported."""
    import subprocess
    import sys
    from pathlib import Path

    code = f"""
import sys, torch, edgecut
from torch import nn
from edgecut.codegen.artifact import build_artifact
from edgecut.types import Cut, Plan, PlanTable
model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
x = torch.randn(1, 3, 8, 8)
gm = edgecut.trace(model, x)
names = [n.name for n in gm.graph.nodes]
mid = Cut("mid", frozenset(names[:3]), (names[2],))
table = PlanTable((1.0,), (Plan(0, mid, 0.0, 0.0, 0.0),))
m = build_artifact(gm, table, "local", "local", {str(tmp_path)!r}, (x,), backend="onnxruntime", progress=False)
assert {{lib.backend for lib in m.libraries}} == {{"onnxruntime"}}
print("tvm imported:", "tvm" in sys.modules)
"""
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tvm imported: False" in out.stdout
