"""Profile a device from the host over TVM RPC: the device runs only the TVM runtime and an RPC
server (scripts/rpc_server.py, or `python -m tvm.exec.rpc_server`, which also needs cloudpickle:
its session workers import it); this machine builds every
benchmark with `edgecut.codegen.build` for the device's target, cross-compiles it with the
target's `cc`, uploads it, and times `main` of a Relax VM created on the device with the
runtime's time evaluator (`VirtualMachine.time_evaluator`: one warm-up call, then `REPEAT`
repeats of at least `MIN_REPEAT_MS` each; the profile keeps `microbench.QUANTILE` of them).

What differs from timing in process (`bench.Local`), and why:
- a lone convolution is its whole program minus the NCHW<->NHWC transforms at its boundary,
  each timed on the device as its own program (`microbench.layout_seconds` does that
  subtraction too); in process the VM's instrument hook times the kernel alone, but that hook is
  a host Python callback the device cannot call;
- for the same reason zoo models give no per-kernel samples, only their whole time;
- a segment call costs the boundary transforms as timed on the device; the numpy <-> TVM copies
  that `codegen.load.Part` adds in Python on the device are not seen over RPC;
- loading is `load_module` + VM creation on the device, timed from here (an RPC round trip
  each), without reading the weights;
- the runtime's message overhead is measured on this machine, not on the device.
"""
from __future__ import annotations

import json
import socket
import tempfile
import threading
from pathlib import Path

import numpy as np

from edgecut.errors import ProfileError

REPEAT = 5
MIN_REPEAT_MS = 20
MACHINE_FUNC = "edgecut.rpc.machine"   # what scripts/rpc_server.py reports (a JSON string)


def _reachable(host: str, port: int, timeout: float) -> None:
    where = f"{host}:{port}"
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        why = f"no answer within {timeout:g} s" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise ProfileError(
            f"cannot reach a TVM RPC server at {where} ({why}). Start one on the device: "
            f"`python scripts/rpc_server.py --host 0.0.0.0 --port {port}` (from an edgecut checkout; needs only "
            f"the TVM runtime) or TVM's `python -m tvm.exec.rpc_server --host 0.0.0.0 --port {port}` (also needs "
            f"cloudpickle); for the emulated Pi here: `scripts/aarch64-env.sh rpc-server {port}`. Then check the "
            "address and any firewall") from None


def _connect(host: str, port: int, timeout: float):
    """`tvm.rpc.connect`, given up after `timeout` s (a port that accepts TCP but is no TVM RPC
    server, or a server busy with another session, never answers the handshake)."""
    from tvm import rpc

    got: dict = {}

    def attempt():
        try:
            got["session"] = rpc.connect(host, port, session_timeout=0)
        except Exception as e:   # noqa: BLE001 - reported below with the address
            got["error"] = e

    th = threading.Thread(target=attempt, daemon=True)
    th.start()
    th.join(timeout)
    if "session" in got:
        return got["session"]
    why = f"the handshake failed: {got['error']}" if "error" in got else f"no RPC handshake within {timeout:g} s"
    raise ProfileError(f"{host}:{port} accepts connections but {why}. Is it a TVM RPC server (not a tracker or "
                       "proxy), and is it free (a server serves one session at a time)?")


def _server_machine(session) -> dict:
    """What the server says it is ({} when it cannot say: `tvm.exec.rpc_server` has no such call)."""
    try:
        return json.loads(session.get_function(MACHINE_FUNC)())
    except Exception:   # noqa: BLE001 - a server without the call; the probe below still checks the arch
        return {}


def _last_line(e: Exception) -> str:
    """The device's own message: the last line of an RPC error (the rest is its traceback)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[-1]


class Remote:
    """A device reached over TVM RPC; the `bench.Local` interface, measured there."""

    def __init__(self, target, host: str, port: int, connect_timeout_s: float = 5.0):
        self.target, self.address = target, f"{host}:{port}"
        self._tmp = tempfile.TemporaryDirectory(prefix="edgecut-rpc-")
        self._n = 0
        self._layouts: dict = {}
        self.note = f"timed on the device over TVM RPC ({self.address})"
        self.session = None
        try:
            _reachable(host, port, connect_timeout_s)
            self.session = _connect(host, port, 2 * connect_timeout_s)
            self.dev = self.session.cpu()
            self.server = _server_machine(self.session)
            arch = self.server.get("machine")
            if arch and arch != target.arch:
                raise ProfileError(
                    f"the RPC server at {self.address} runs on {arch}, but target {target.name!r} builds for "
                    f"{target.arch}; pass the target of that device (--target pi4 for a 64-bit Raspberry Pi OS, "
                    "see `edgecut.targets.known()`), or --rpc the device you meant")
            self._probe()
        except BaseException:
            self.close()   # free the server for the next session
            raise

    # --- the device ---------------------------------------------------------------------------
    def _export(self, built) -> Path:
        """`built` cross-compiled for the target, in a fresh file (a library path is loaded once)."""
        from edgecut.codegen.artifact import export_library

        self._n += 1
        path = Path(self._tmp.name, f"edgecut_bench_{self._n}.so")
        export_library(built, path, self.target)
        return path

    def _load(self, path: Path, what: str, on_upload=None):
        """Upload the library at `path` and load it on the device (`on_upload()` is called
        between the two)."""
        try:
            self.session.upload(str(path))
            if on_upload:
                on_upload()
            lib = self.session.load_module(path.name)
            self.session.remove(path.name)
        except Exception as e:   # noqa: BLE001 - the device's own error, with what we sent
            raise ProfileError(f"the device at {self.address} could not load {what} built for target "
                               f"{self.target.name!r} ({self.target.arch}, {self.target.tvm_target()}): "
                               f"{_last_line(e)}. Is the device an {self.target.arch} "
                               "machine with a TVM runtime of this version?") from None
        return lib

    def _vm(self, built, what: str):
        from tvm import relax

        return relax.VirtualMachine(self._load(self._export(built), what), self.dev)

    def _args(self, built, shapes, seed: int = 0) -> list:
        import tvm

        rng = np.random.default_rng(seed)
        xs = [rng.standard_normal(s).astype("float32") for s in shapes]
        return [tvm.runtime.tensor(np.ascontiguousarray(a), self.dev) for a in [*xs, *built.params]]

    def _probe(self) -> None:
        """Run one small program on the device and compare it with numpy: the device loads what
        the target builds (a wrong arch fails here even when the server cannot say its arch)."""
        import tvm
        from torch import nn

        from edgecut.costmodel.microbench import compile_module

        shape = (1, 4, 4, 4)
        built = compile_module(nn.ReLU(), [shape], self.target)
        vm = self._vm(built, "a probe program")
        x = np.random.default_rng(0).standard_normal(shape).astype("float32")
        got = vm["main"](tvm.runtime.tensor(x, self.dev)).numpy()
        if not np.allclose(got, np.maximum(x, 0)):
            raise ProfileError(f"the device at {self.address} computed a wrong ReLU for target "
                               f"{self.target.name!r}; its TVM runtime does not match this build")

    # --- the bench interface ------------------------------------------------------------------
    def time(self, built, shapes, as_segment: bool = False, cold: bool = False, what: str = "a benchmark") -> float:
        """Seconds of one call of `built` on the device (`as_segment` is the same call here: the
        numpy conversions happen in Python on a device, which RPC does not run). `cold`: the
        weights are flushed from the caches before every run (the runtime's cache flush)."""
        from edgecut.costmodel.microbench import QUANTILE

        vm = self._vm(built, what)
        args = self._args(built, shapes)
        try:
            # the flush runs before each repeat: a cold repeat is one run (no min_repeat_ms)
            timer = vm.time_evaluator("main", self.dev, number=1, repeat=REPEAT,
                                      min_repeat_ms=0 if cold else MIN_REPEAT_MS,
                                      f_preproc="cache_flush_cpu_non_first_arg" if cold else "")
            runs = timer(*args).results
        except Exception as e:   # noqa: BLE001
            raise ProfileError(f"timing {what} on the device at {self.address} failed: "
                               f"{_last_line(e)}") from None
        return float(np.quantile(runs, QUANTILE))

    def layout(self, shape) -> float:
        """Seconds of an NCHW -> NHWC transform of `shape` on the device (cached per shape)."""
        from edgecut.costmodel.microbench import _ToNHWC, compile_module

        shape = tuple(shape)
        if shape not in self._layouts:
            built = compile_module(_ToNHWC(), [shape], self.target)
            self._layouts[shape] = self.time(built, [shape], what=f"a layout transform of {shape}")
        return self._layouts[shape]

    def layer(self, case):
        from edgecut.costmodel.features import edgent_features, work_features
        from edgecut.costmodel.microbench import Sample, compile_module, layer_nodes
        from edgecut.frontend import meta as M

        nodes = layer_nodes(case.module, case.shapes)
        built = compile_module(case.module, case.shapes, self.target)
        kind = nodes[0].meta[M.KIND] if len(nodes) == 1 else None
        seconds = self.time(built, case.shapes, cold=kind == M.LINEAR, what=case.label)
        if kind in (M.CONV, M.DWCONV):   # without the boundary transforms a whole model pays once
            boundary = self.layout(case.shapes[0]) + self.layout(nodes[0].meta[M.SHAPE])
            seconds = max(seconds - boundary, 0.25 * seconds)
        return [Sample(case.label, n.meta[M.KIND], edgent_features(n), work_features(n), seconds) for n in nodes]

    def model(self, name: str, side: int, fused_s_per_elem: float):
        from edgecut import zoo
        from edgecut.costmodel.microbench import compile_module

        shape = (1, 3, side, side)
        built = compile_module(zoo.get(name), [shape], self.target)
        return [], self.time(built, [shape], what=f"{name}@{side}")

    def segment(self, shapes) -> dict:
        """Per segment call: its two boundary layout transforms (input and output of a 1x1
        conv of `shapes`), each timed on the device as its own VM call."""
        from edgecut.costmodel.kernels import fit_segment

        return fit_segment([(2 * int(np.prod(s)), 2 * self.layout(s)) for s in shapes])

    def loading(self, sizes, on_step=None, repeats: int = 3) -> dict:
        import time

        from torch import nn
        from tvm import relax

        from edgecut.costmodel.microbench import compile_module

        points = []
        for fi, fo in sizes:
            built = compile_module(nn.Linear(fi, fo), [(1, fi)], self.target)
            nbytes = sum(int(p.nbytes) for p in built.params)
            path, times = self._export(built), []
            for i in range(repeats):
                copy = path.with_name(f"{path.stem}_{i}.so")
                copy.write_bytes(path.read_bytes())
                start = []
                lib = self._load(copy, f"linear{fi}-{fo}", on_upload=lambda: start.append(time.perf_counter()))
                relax.VirtualMachine(lib, self.dev)
                times.append(time.perf_counter() - start[0])
            points.append((path.stat().st_size + nbytes, float(np.median(times))))
            if on_step:
                on_step()
        x, y = np.array(points).T
        slope, intercept = np.polyfit(x, y, 1)
        return {"s_per_byte": float(max(slope, 0.0)), "intercept": float(max(intercept, 0.0)),
                "points": [list(p) for p in points], "measured": "over TVM RPC, without reading weights"}

    def machine(self) -> dict:
        import tvm

        from edgecut.costmodel.bench import machine_description

        host = machine_description(self.target)
        return {"measured": "over TVM RPC", "rpc": self.address,
                "machine": self.server.get("machine", self.target.arch),
                "machine_checked": "server report and probe" if self.server else "probe (the server does not report)",
                "platform": self.server.get("platform", ""), "cpu": self.server.get("cpu", ""),
                "cpus": self.server.get("cpus"), "tvm_num_threads": self.server.get("tvm_num_threads", ""),
                "tvm": self.server.get("tvm", ""), "tvm_host": tvm.__version__, "tvm_target": host["tvm_target"],
                "build_py_sha256": host["build_py_sha256"],
                "host": {k: host[k] for k in ("platform", "machine", "cpu", "cpus")},
                "note": self.server.get("note", ""), "message_overhead": "measured on the host"}

    def close(self) -> None:
        """End the session now (a server serves one at a time; garbage collection may be late)."""
        if self.session is not None:
            try:
                self.session._sess.get_function("CloseRPCConnection")()
            except Exception:   # noqa: BLE001 - already closed by the other side
                pass
            self.session = None
        self._tmp.cleanup()
