"""TVM builds of an artifact's segments, in worker processes when the model is big enough.

One TVM build (legalize, schedule, LLVM) runs on one core, and TVM's compiler state is not
thread-safe, so `build_artifact` imports each segment here (torch.export -> Relax) and hands the
(segment, target) builds of a large model to worker processes, while it checks libraries and
exports ONNX copies itself. A worker gets the Relax module as TVM's JSON and the weights as
arrays, builds, writes the shared library and sends the weights back.

Workers are plain subprocesses (`python -m edgecut.codegen.parallel`) speaking length-prefixed
pickles over their stdin and stdout, not multiprocessing: a spawned multiprocessing child imports
the caller's main script again, which breaks any user script without an `if __name__ ==
"__main__"` guard. A small model, or `EDGECUT_BUILD_JOBS=1`, builds in the calling process, as
before: a worker costs a few seconds to start (importing TVM).
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading

log = logging.getLogger("edgecut.codegen")

JOBS_ENV = "EDGECUT_BUILD_JOBS"
# below this many multiply-accumulates and graph nodes in the model, starting workers costs more
# than it saves: a build's time follows its kernels (nodes) more than its arithmetic, so a light
# model of many small ops (timm's ghostnet_050: 42 M MACs, 9 segments, 150 s serially) gets them too
MIN_MACS = 50e6
MIN_NODES = 150
MAX_JOBS = 4


class BuildFailed(Exception):
    """A (segment, target) build failed (segments are imported by the caller, whose ImportFailed
    says where); the message says why."""


def jobs_for(macs: float, builds: int, nodes: int = 0) -> int:
    """How many worker processes build `builds` libraries of a model of `macs` multiply-adds and
    `nodes` graph nodes (0: in this one)."""
    cores = os.cpu_count() or 1
    env = os.environ.get(JOBS_ENV, "")
    if env:
        n = int(env)
        return 0 if n <= 1 else min(n, builds)
    if (macs < MIN_MACS and nodes < MIN_NODES) or builds < 3 or cores < 2:
        return 0
    return min(cores, builds, MAX_JOBS)


def build_one(imported, num_inputs: int, target, lib_path, winograd_tile: int = 4) -> list:
    """Build the imported segment (Relax module, weights) for `target` and write its library to
    `lib_path`; its weights as `main` wants them. Raises BuildFailed."""
    from edgecut import targets as _targets
    from edgecut.codegen.artifact import export_library
    from edgecut.codegen.build import build

    target = _targets.get(target)
    try:
        built = build(*imported, target, num_inputs=num_inputs, winograd_tile=winograd_tile)
        export_library(built, str(lib_path), target)
    except Exception as e:  # noqa: BLE001 - the segment falls back (or the build stops)
        raise BuildFailed(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1][:300]}") from e
    return built.params


# -- the channel: 8-byte length, then a pickle ------------------------------------------------------

def _send(f, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(struct.pack("<Q", len(data)))
    f.write(data)
    f.flush()


def _recv(f):
    head = f.read(8)
    if len(head) < 8:
        raise EOFError("the build worker closed its pipe")
    (n,) = struct.unpack("<Q", head)
    return pickle.loads(f.read(n))


def _serve() -> None:
    """The worker: build requests from stdin until it closes. Its stdout is the channel only
    (whatever else writes to fd 1 lands on stderr)."""
    chan = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    import tvm

    while True:
        try:
            text, params, num_inputs, target, lib_path, level, tile = _recv(sys.stdin.buffer)
        except EOFError:
            return
        logging.getLogger("edgecut").setLevel(level)
        try:
            out = ("ok", build_one((tvm.ir.load_json(text), params), num_inputs, target, lib_path, tile))
        except BuildFailed as e:
            out = ("failed", str(e))
        except Exception as e:  # noqa: BLE001 - reported to the caller, the worker goes on
            out = ("failed", f"{type(e).__name__}: {e}"[:400])
        _send(chan, out)


class Builds:
    """(segment, target) builds: submitted up front to `jobs` workers (none: built on request)."""

    def __init__(self, jobs: int):
        self.futures, self.procs, self.threads = {}, [], []
        self.tasks: queue.Queue = queue.Queue()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        for _ in range(max(0, jobs)):
            proc = subprocess.Popen([sys.executable, "-m", "edgecut.codegen.parallel"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, env=env)
            self.procs.append(proc)
            t = threading.Thread(target=self._feed, args=(proc,), daemon=True, name="edgecut-build")
            t.start()
            self.threads.append(t)

    def _feed(self, proc) -> None:
        while True:
            task = self.tasks.get()
            if task is None:
                return
            fut, request = task
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                _send(proc.stdin, request)
                status, value = _recv(proc.stdout)
            except (OSError, EOFError) as e:
                fut.set_exception(BuildFailed(f"the build worker died ({e}); rerun with {JOBS_ENV}=1"))
                return
            if status == "ok":
                fut.set_result(value)
            else:
                fut.set_exception(BuildFailed(value))

    def submit(self, imported, num_inputs: int, name: str, target, lib_path, winograd_tile: int = 4) -> None:
        """Start building segment `name` (imported: Relax module, weights) for `target` (a Target)."""
        if not self.procs:
            return
        import tvm

        request = (tvm.ir.save_json(imported[0]), imported[1], num_inputs, target, str(lib_path),
                   logging.getLogger("edgecut").getEffectiveLevel(), winograd_tile)
        fut = cf.Future()
        self.futures[(name, target.name)] = fut
        self.tasks.put((fut, request))

    def result(self, name: str, target_name: str, here) -> list:
        """The weights of the (name, target) library from a worker, or `here()` when no worker has
        it; raises BuildFailed."""
        fut = self.futures.pop((name, target_name), None)
        return here() if fut is None else fut.result()

    def discard(self, name: str) -> None:
        """Wait out the builds of segment `name` still queued or running (it falls back): nothing
        may write its libraries after the caller removed them."""
        for key in [k for k in self.futures if k[0] == name]:
            fut = self.futures.pop(key)
            if not fut.cancel():
                try:
                    fut.result()
                except Exception:  # noqa: BLE001 - its result is not wanted
                    pass

    def close(self) -> None:
        for fut in self.futures.values():
            fut.cancel()
        for _ in self.threads:
            self.tasks.put(None)
        for t in self.threads:
            t.join()
        for proc in self.procs:
            proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs, self.threads = [], []


if __name__ == "__main__":
    _serve()
