"""The device path never imports torch: load and run an artifact with torch made unimportable."""
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_table, three_cuts

import edgecut
from edgecut import zoo
from edgecut.codegen.artifact import build_artifact

BLOCK_TORCH = textwrap.dedent('''
    import sys
    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is not installed on this device (tried {name})")
    sys.meta_path.insert(0, NoTorch())
''')

RUN = BLOCK_TORCH + textwrap.dedent('''
    import numpy as np
    import edgecut
    from edgecut.codegen.manifest import load_arrays, max_error
    path, backend = sys.argv[1], sys.argv[2]
    ref = load_arrays(path + "/reference.msgpack")
    dev = edgecut.load(path, "device", backend)
    edge = edgecut.load(path, "edge", backend)
    for plan in dev.table.plans:
        res = dev.run(plan.id, dict(ref["inputs"]))
        if not res.done:
            res = edge.run(plan.id, res.outputs)
        err = max_error(res.outputs["logits"], ref["logits"][str(res.exit_id)])
        assert err <= 1e-4, (plan.id, err)
    from edgecut.cli import check
    assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
    print("ok", len(dev.table.plans))
''')


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model, x = zoo.get("tiny_dag"), torch.randn(1, 3, 16, 16)
    gm = edgecut.trace(model, x)
    out = tmp_path_factory.mktemp("art")
    build_artifact(gm, make_table(gm, three_cuts(gm, ["add"])), "local", "local", out, (x,), progress=False)
    return out


@pytest.mark.parametrize("backend", ["tvm", "onnxruntime"])
def test_device_and_edge_run_without_torch(artifact, backend):
    proc = subprocess.run([sys.executable, "-c", RUN, str(artifact), backend], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok 3")


def test_check_cli_without_torch(artifact):
    # `edgecut check`'s own module; the `edgecut` entry point also imports the other subcommands
    code = BLOCK_TORCH + textwrap.dedent('''
        import argparse
        from edgecut.cli import check
        p = argparse.ArgumentParser().add_subparsers()
        check.register(p)
        args = p.choices["check"].parse_args([sys.argv[1]])
        sys.exit(args.func(args))
    ''')
    proc = subprocess.run([sys.executable, "-c", code, str(artifact)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout
    assert "device (tvm): plan e0/device" in proc.stdout


def test_the_blocker_blocks():
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH + "import torch"], capture_output=True, text=True)
    assert proc.returncode != 0 and "not installed on this device" in proc.stderr
