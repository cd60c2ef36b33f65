"""The Pi's code for real: build the pi4 (aarch64, cortex-a72) device libraries of a tiny model,
run them under qemu-aarch64 user mode with an arm64 Python and the aarch64 TVM runtime wheel
(no torch there), and compare with the x86 build. First run sets up ~/.cache/edgecut (~1 min)."""
import textwrap

import msgpack
import numpy as np
import pytest
import torch
from conftest import make_table, three_cuts

import edgecut
from edgecut import zoo
from edgecut.codegen import qemu
from edgecut.codegen.artifact import build_artifact
from edgecut.codegen.load import load
from edgecut.codegen.manifest import max_error
from edgecut.errors import ArtifactError

pytestmark = pytest.mark.qemu

SCRIPT = textwrap.dedent('''
    import platform, sys, msgpack, numpy as np
    import edgecut
    part = edgecut.load(sys.argv[1], "device")
    x = np.frombuffer(open(sys.argv[2], "rb").read(), np.float32).reshape(1, 3, 16, 16)
    out = {"machine": platform.machine(), "torch": "torch" in sys.modules}
    for plan in (part.fallback_plan_id, "e0/mid"):
        res = part.run(plan, {"x": x})
        out[plan] = {k: v.tobytes() for k, v in res.outputs.items()}
    open(sys.argv[3], "wb").write(msgpack.packb(out))
''')


def test_pi4_library_runs_under_qemu(tmp_path):
    why = qemu.available()
    if why:
        pytest.skip(why)
    model, x = zoo.get("tiny_chain"), torch.randn(1, 3, 16, 16)
    gm = edgecut.trace(model, x)
    table = make_table(gm, three_cuts(gm, ["pool1"]))
    pi = build_artifact(gm, table, "pi4", "local", tmp_path / "pi4", (x,), onnx=False, progress=False)
    build_artifact(gm, table, "local", "local", tmp_path / "x86", (x,), onnx=False, progress=False)
    lib = pi.libraries_of("device")["seg0"]
    assert lib.arch == "aarch64" and "cortex-a72" in lib.tvm_target
    assert (tmp_path / "pi4" / lib.file).read_bytes()[:4] == b"\x7fELF"
    assert (tmp_path / "pi4" / lib.file).read_bytes()[18] == 183            # e_machine: EM_AARCH64
    with pytest.raises(ArtifactError, match="aarch64"):
        load(tmp_path / "pi4", "device")                                      # not on this x86 machine

    (tmp_path / "run.py").write_text(SCRIPT)
    (tmp_path / "x.bin").write_bytes(x.numpy().tobytes())
    proc = qemu.run_aarch64(tmp_path / "run.py", tmp_path / "pi4", tmp_path / "x.bin", tmp_path / "out.msgpack")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = msgpack.unpackb((tmp_path / "out.msgpack").read_bytes())
    assert got["machine"] == "aarch64" and got["torch"] is False

    x86 = load(tmp_path / "x86", "device")
    want = model(x).detach().numpy()
    for plan in ("e0/device", "e0/mid"):
        ref = x86.run(plan, {"x": x.numpy()}).outputs
        assert set(got[plan]) == set(ref)
        for name, arr in ref.items():
            arm = np.frombuffer(got[plan][name], np.float32).reshape(arr.shape)
            assert max_error(arm, arr) <= 1e-4, (plan, name)
    arm_logits = np.frombuffer(got["e0/device"]["logits"], np.float32).reshape(want.shape)
    assert max_error(arm_logits, want) <= 1e-4
