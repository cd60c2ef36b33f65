"""Where `profile_target` times what it builds: `Local` runs each executable in this process
(the target must run here); `remote.Remote` cross-compiles it, uploads it to a device over TVM
RPC and times it there with the runtime's time evaluator (`open_bench(target, rpc=...)`).

Both answer the same questions, so the profiling loop is one: `time` (one built program),
`layer` (one grid case, as Samples), `model` (a zoo model: kernel samples where the bench can see
kernels, and its whole time), `segment` (what a segment call costs beyond its kernels), `loading`
and `machine` (the description stored in the profile), plus `note` (a sentence for its notes).
"""
from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

from edgecut.errors import ProfileError


def machine_description(target) -> dict:
    """This machine, the TVM it runs and the build pipeline (hash of codegen/build.py)."""
    import tvm

    from edgecut.codegen import build as build_module

    from edgecut.runtime.calibration import cpu_model

    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu_model(),
            "cpus": os.cpu_count(), "tvm_num_threads": os.environ.get("TVM_NUM_THREADS", ""),
            "tvm": tvm.__version__, "tvm_target": str(target.tvm_target()),
            "build_py_sha256": hashlib.sha256(Path(build_module.__file__).read_bytes()).hexdigest()[:16]}


class Local:
    """Times in this process, as deployment on this machine runs (see microbench, kernels)."""

    note = ""

    def __init__(self, target):
        if not target.runs_here:
            raise ProfileError(
                f"target {target.name!r} ({target.arch}) does not run on this {platform.machine()} machine; "
                f"run `edgecut profile --target {target.name}` on the device itself, or measure it from here "
                f"over TVM RPC: `edgecut profile --target {target.name} --rpc HOST:PORT` with an RPC server "
                "running on the device")
        self.target = target
        os.environ.setdefault("TVM_NUM_THREADS", "2")

    def time(self, built, shapes, as_segment: bool = False) -> float:
        from edgecut.costmodel.microbench import time_built
        return time_built(built, shapes, as_segment=as_segment)

    def layer(self, case):
        from edgecut.costmodel.microbench import measure
        return measure(case, self.target)

    def model(self, name: str, side: int, fused_s_per_elem: float):
        from edgecut.costmodel.kernels import model_samples
        samples, whole, _ = model_samples(name, side, self.target, fused_s_per_elem)
        return samples, whole

    def segment(self, shapes) -> dict:
        from edgecut.costmodel.kernels import measure_segment_overhead
        return measure_segment_overhead(self.target, shapes)

    def loading(self, sizes, on_step=None) -> dict:
        from edgecut.costmodel.loading import measure_loading
        return measure_loading(self.target, sizes, on_step=on_step)

    def machine(self) -> dict:
        return dict(machine_description(self.target), measured="in process")

    def close(self) -> None:
        pass


def parse_address(text: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port), with a clear error."""
    from edgecut.errors import UsageError

    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--rpc {text!r}: expected HOST:PORT of a TVM RPC server, e.g. 192.168.1.20:9090")
    return host, int(port)


def open_bench(target, rpc: str | None = None, connect_timeout_s: float = 5.0):
    """`Local(target)`, or a `remote.Remote` connected to the RPC server at `rpc` ('HOST:PORT')."""
    if rpc is None:
        return Local(target)
    from edgecut.costmodel.remote import Remote

    host, port = parse_address(rpc)
    return Remote(target, host, port, connect_timeout_s)
