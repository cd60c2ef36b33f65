"""`edgecut profile --rpc`: layers cross-compiled here, timed on a device through TVM RPC.

The device is (a) TVM's own RPC server on this machine (`tvm.rpc.Server`, what a user starts with
`python -m tvm.exec.rpc_server`; it does not report its arch), and (b) an emulated Pi 4: the
aarch64 TVM runtime, no torch, no compiler library, under qemu-aarch64 (scripts/aarch64-env.sh
rpc-server). Timings under qemu say nothing about a Pi; the path is what is tested.
"""
import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
from torch import nn

from edgecut import targets
from edgecut.cli import main
from edgecut.codegen import qemu
from edgecut.costmodel import microbench as mb
from edgecut.costmodel import load_profile, profile_target
from edgecut.costmodel.remote import Remote
from edgecut.errors import ProfileError
from edgecut.frontend import meta as M

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stock_server():
    from tvm import rpc

    port = _free_port()
    server = rpc.Server("127.0.0.1", port=port, port_end=port + 50, silent=True)
    yield f"127.0.0.1:{server.port}"
    server.terminate()


def test_unreachable_server_is_a_clear_error_within_seconds():
    port = _free_port()
    t0 = time.perf_counter()
    with pytest.raises(ProfileError, match=f"127.0.0.1:{port}.*rpc_server"):
        profile_target("pi4", rpc=f"127.0.0.1:{port}", tiny=True, progress=False)
    assert time.perf_counter() - t0 < 5
    assert main(["profile", "--target", "pi4", "--rpc", "127.0.0.1"]) == 2   # no port: usage error


def test_a_port_that_is_no_rpc_server_does_not_hang():
    with socket.socket() as listener:                # accepts TCP, never answers the handshake
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        host, port = listener.getsockname()
        t0 = time.perf_counter()
        with pytest.raises(ProfileError, match=f"{port} accepts connections but no RPC handshake"):
            Remote(targets.get("pi4"), host, port, connect_timeout_s=1.0)
        assert time.perf_counter() - t0 < 15


def test_wrong_arch_is_refused_by_the_probe(stock_server):
    """TVM's stock server does not say its arch: the aarch64 probe library fails to load on x86."""
    host, port = stock_server.rsplit(":", 1)
    with pytest.raises(ProfileError, match="could not load a probe program built for target 'pi4' "
                                           r"\(aarch64.*Is the device an aarch64 machine"):
        Remote(targets.get("pi4"), host, int(port))


def test_layers_timed_over_rpc(stock_server, tmp_path):
    """This machine as the device, through the RPC path: a conv (its boundary transforms timed and
    subtracted) and a linear layer (cold caches)."""
    host, port = stock_server.rsplit(":", 1)
    bench = Remote(targets.get("local"), host, int(port))
    try:
        assert bench.server == {} and bench.machine()["machine_checked"].startswith("probe")
        conv = bench.layer(mb.Case("c", nn.Conv2d(8, 16, 3, padding=1), ((1, 8, 16, 16),)))
        lin = bench.layer(mb.Case("l", nn.Linear(512, 256), ((1, 512),)))
    finally:
        bench.close()
    assert [s.kind for s in conv + lin] == [M.CONV, M.LINEAR]
    assert all(0 < s.seconds < 0.5 for s in conv + lin)


def _start_emulated_pi():
    proc = subprocess.Popen([str(ROOT / "scripts" / "aarch64-env.sh"), "rpc-server", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240                # importing TVM under qemu: ~20-30 s
    for line in proc.stdout:
        if line.startswith("rpc server listening on "):
            return proc, line.split()[-1]
        if time.monotonic() > deadline:
            break
    proc.kill()
    pytest.fail(f"the emulated RPC server did not start: {proc.stdout.read()[-2000:]}")


@pytest.mark.qemu
@pytest.mark.filterwarnings("ignore:annotate_cost")   # the tiny profile has no regressor for the chain's pools
def test_profile_pi4_over_rpc_on_emulated_device(tmp_path, capsys):
    why = qemu.available()
    if why:
        pytest.skip(why)
    qemu.setup()
    proc, address = _start_emulated_pi()
    try:
        out = tmp_path / "pi4.json"
        assert main(["profile", "--target", "pi4", "--rpc", address, "--tiny", "-o", str(out)]) == 0
        assert f"measured on aarch64 over TVM RPC at {address}, emulated" in capsys.readouterr().out
        # a program without kernels (its library packs only the VM code) cross-compiles and runs
        host, port = address.rsplit(":", 1)
        bench = Remote(targets.get("pi4"), host, int(port))
        try:
            drop = bench.layer(mb.Case("drop", nn.Dropout(), ((1, 8, 4, 4),)))
        finally:
            bench.close()
        assert drop[0].kind == M.DROPOUT and drop[0].seconds > 0
        # an x86 target against the aarch64 server: refused with both arches named
        with pytest.raises(ProfileError, match="runs on aarch64, but target 'local' builds for x86_64"):
            profile_target("local", rpc=address, tiny=True, progress=False)
    finally:
        proc.kill()
        proc.wait()
    machine = json.loads(out.read_text())["machine"]
    assert machine["measured"] == "over TVM RPC" and machine["machine"] == "aarch64"
    assert machine["rpc"] == address and machine["note"].startswith("emulated: qemu-aarch64")
    prof = load_profile(out, target="pi4")
    assert prof.source == "measured" and len(prof.samples) == 3 and prof.has(M.CONV)
    assert all(s["seconds"] > 0 for s in prof.samples)
    conv = mb.layer_nodes(nn.Conv2d(16, 32, 3, padding=1), [(1, 16, 16, 16)])[0]
    from edgecut.costmodel.features import edgent_features, work_features

    assert prof.predict(M.CONV, edgent_features(conv), work_features(conv)) > 0
    assert prof.segment_seconds(1000, 1000) > 0 and prof.loading["points"]
