"""Segments built by worker processes (edgecut/codegen/parallel.py): same checks, same fallbacks,
and a user's script without an `if __name__ == "__main__"` guard still compiles."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_table, three_cuts
from torch import nn

import edgecut
from edgecut.codegen.artifact import build_artifact
from edgecut.codegen.importer import FAIL_IMPORT_ENV
from edgecut.codegen.load import load
from edgecut.codegen.manifest import max_error
from edgecut.codegen.parallel import JOBS_ENV, MIN_MACS, MIN_NODES, jobs_for
from edgecut.errors import CodegenWarning

ROOT = Path(__file__).resolve().parents[2]


def test_workers_only_for_models_worth_it(monkeypatch):
    monkeypatch.delenv(JOBS_ENV, raising=False)
    assert jobs_for(MIN_MACS / 10, 20) == 0            # starting workers would cost more
    assert jobs_for(MIN_MACS * 10, 2) == 0
    assert jobs_for(MIN_MACS * 10, 20) == (min(os.cpu_count(), 4) if os.cpu_count() > 1 else 0)
    assert jobs_for(MIN_MACS / 10, 20, nodes=MIN_NODES) == jobs_for(MIN_MACS * 10, 20)   # many small ops
    monkeypatch.setenv(JOBS_ENV, "1")
    assert jobs_for(MIN_MACS * 10, 20) == 0
    monkeypatch.setenv(JOBS_ENV, "2")
    assert jobs_for(1.0, 5) == 2


def test_workers_build_check_and_fall_back(tmp_path, monkeypatch):
    """Two workers: every TVM segment checked against PyTorch here; one segment refused on
    purpose falls back to ONNX Runtime; every plan still equals eager."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 5)).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = edgecut.trace(model, x)
    names = [n.name for n in gm.graph.nodes]
    table = make_table(gm, three_cuts(gm, [names[2]]))
    monkeypatch.setenv(JOBS_ENV, "2")
    monkeypatch.setenv(FAIL_IMPORT_ENV, "seg1")
    with pytest.warns(CodegenWarning, match="segment seg1"):
        m = build_artifact(gm, table, "local", "local", tmp_path, (x,), progress=False)
    assert {lib.backend for lib in m.libraries if lib.segment == "seg1"} == {"onnxruntime"}
    tvm_segs = {lib.segment for lib in m.libraries if lib.backend == "tvm"}
    assert tvm_segs and all("tvm_vs_torch" in m.checks[s] for s in tvm_segs)
    assert not (tmp_path / "device" / "seg1.so").exists() and not (tmp_path / "edge" / "seg1.so").exists()
    want = model(x).detach().numpy()
    for plan in table.plans:
        dev, edge = load(tmp_path, "device"), load(tmp_path, "edge")
        res = dev.run(plan.id, {dev.input_names[0]: x.numpy()})
        res = res if res.done else edge.run(plan.id, res.outputs)
        assert max_error(res.outputs["logits"], want) <= 1e-4


SCRIPT = """
import torch, edgecut
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                      nn.Linear(8 * 4 * 4, 5)).eval()
x = torch.randn(1, 3, 8, 8)
art = edgecut.compile(model, x, target="local", edge="local", deadline=1.0, exits=None, rtt="20ms",
                      out_dir=OUT, progress=False)
assert {lib.backend for lib in art.manifest.libraries} == {"tvm"}
print("compiled", len(art.manifest.libraries))
"""


def test_a_script_without_main_guard_compiles_with_workers(tmp_path):
    """A user's plain script (no `if __name__ == "__main__"`): workers must not run it again."""
    script = tmp_path / "user_script.py"
    script.write_text(f"OUT = {str(tmp_path / 'art')!r}\n" + SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT), JOBS_ENV: "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("compiled") == 1
