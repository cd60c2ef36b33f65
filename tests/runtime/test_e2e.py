"""End to end with a real compiled artifact (tiny_chain through TVM): `edgecut serve` and
`edgecut run` as processes (the device one with torch made unimportable), and the Python API."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import edgecut
from edgecut import zoo
from edgecut.codegen.artifact import build_artifact
from edgecut.frontend import meta
from edgecut.runtime.client import DeviceRuntime
from edgecut.runtime.server import EdgeServer
from edgecut.types import Cut, Plan, PlanTable

pytestmark = pytest.mark.timeout(600)

NO_TORCH_CLI = textwrap.dedent('''
    import sys
    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is not installed on this device (tried {name})")
    sys.meta_path.insert(0, NoTorch())
    from edgecut.cli import main
    rc = main(sys.argv[1:])
    assert "torch" not in sys.modules
    sys.exit(rc)
''')


def chain_table(gm) -> PlanTable:
    """Edge-only below 1 Mbit/s is silly, but makes every plan reachable by bandwidth:
    [0, 1e6): device-only, [1e6, 1e8): cut after pool1, [1e8, inf): everything on the edge."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("output", "get_attr")]
    names = [n.name for n in nodes]

    def cut(label, k):
        crossing = () if k == len(nodes) - 1 else (names[k],)
        return Cut(label, frozenset(names[:k + 1]), crossing, int(nodes[k].meta[meta.OUT_BYTES]) if crossing else 0)

    k_pool = names.index("pool1")
    plans = (Plan(0, cut("device", len(nodes) - 1), 0.01, 0.0, 0.0, 0.5),
             Plan(0, cut("mid", k_pool), 0.005, 0.001, 0.005, 0.5),
             Plan(0, cut("input", 0), 0.0, 0.002, 0.01, 0.5))
    return PlanTable((0.0, 1e6, 1e8), plans)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    model = zoo.get("tiny_chain").eval()
    x = torch.randn(1, 3, 16, 16)
    gm = edgecut.trace(model, x)
    out = tmp_path_factory.mktemp("tiny_chain")
    build_artifact(gm, chain_table(gm), "local", "local", out, (x,), onnx=False, progress=False)
    with torch.no_grad():
        want = model(x).numpy()
    return out, x.numpy(), want


def test_python_api_every_plan(artifact):
    path, x, want = artifact
    # nothing measured on either side: the artifact's own table routes every request
    with EdgeServer(path, "127.0.0.1", 0, calibrate=False) as server:
        for bw, plan, where in ((1e5, "e0/device", "device"), (1e7, "e0/mid", "edge"), (1e9, "e0/input", "edge")):
            with DeviceRuntime(path, edge=server.address, probe_interval=None, initial_bandwidth=bw,
                               calibrate=False) as rt:
                r = rt.infer(x)
                assert (r.plan_id, r.where) == (plan, where), r.reason
                assert np.abs(r.logits - want).max() <= 1e-4
    assert server.stats["requests"] == 2 and server.stats["errors"] == 0     # counted as connections close


def test_cli_serve_and_torch_free_run(artifact, tmp_path):
    path, x, want = artifact
    np.save(tmp_path / "x.npy", x)
    serve = subprocess.Popen([sys.executable, "-m", "edgecut", "serve", str(path), "--port", "0", "--no-calibrate"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = serve.stdout.readline()
        assert line.startswith("edgecut serve:"), serve.stderr.read()
        addr = line.split()[-1]
        for bw in ("10mbit", "1gbit"):
            r = subprocess.run([sys.executable, "-c", NO_TORCH_CLI, "run", str(path), "--edge", addr, "--input",
                                str(tmp_path / "x.npy"), "--json", "--bandwidth", bw, "--no-calibrate", "--output",
                                str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-3000:]
            d = json.loads(r.stdout.splitlines()[-1])
            assert d["where"] == "edge" and d["plan"] == ("e0/mid" if bw == "10mbit" else "e0/input")
            assert np.abs(np.load(tmp_path / "y.npy") - want).max() <= 1e-4
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0
    log = serve.stderr.read()
    assert log.count("connection 127.0.0.1") == 2 and "draining" in log
    # the edge is gone now: the device answers locally and says so
    r = subprocess.run([sys.executable, "-m", "edgecut", "run", str(path), "--edge", addr, "--input",
                        str(tmp_path / "x.npy"), "--bandwidth", "1gbit", "--no-calibrate"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "on fallback" in r.stdout and "unreachable" in r.stdout, r.stdout + r.stderr
