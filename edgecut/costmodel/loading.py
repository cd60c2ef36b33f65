"""Model-loading cost (Edgent's last regression): seconds to load a compiled library and its
weights as a function of their size in bytes, measured by exporting layers of several sizes with
`export_library` and timing `tvm.runtime.load_module` + VM creation + reading the weights.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from torch import nn

SIZES = ((256, 256), (1024, 1024), (2048, 2048), (4096, 2048))


def _load_once(so: Path, params: Path) -> float:
    import tvm
    from tvm import relax

    t0 = time.perf_counter()
    lib = tvm.runtime.load_module(str(so))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    with np.load(params) as z:
        ws = [tvm.runtime.tensor(z[k], tvm.cpu()) for k in sorted(z.files)]
    dt = time.perf_counter() - t0
    del vm, ws
    return dt


def measure_loading(target, sizes=SIZES, repeats: int = 3, on_step=None) -> dict:
    """Fit loading seconds = intercept + s_per_byte * bytes; returns those and the points."""
    from edgecut.costmodel.microbench import compile_module

    points = []
    with tempfile.TemporaryDirectory(prefix="edgecut-load-") as tmp:
        for i, (fi, fo) in enumerate(sizes):
            built = compile_module(nn.Linear(fi, fo), [(1, fi)], target)
            so, params = Path(tmp, f"m{i}.so"), Path(tmp, f"m{i}.npz")
            built.executable.export_library(str(so))
            np.savez(params, **{f"p{j:03d}": p for j, p in enumerate(built.params)})
            nbytes = so.stat().st_size + params.stat().st_size
            points.append((nbytes, float(np.median([_load_once(so, params) for _ in range(repeats)]))))
            if on_step:
                on_step()
    x, y = np.array(points).T
    slope, intercept = np.polyfit(x, y, 1)
    return {"s_per_byte": float(max(slope, 0.0)), "intercept": float(max(intercept, 0.0)),
            "points": [list(p) for p in points]}
