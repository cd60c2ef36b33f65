"""SlowDevice stretches the compiled segments of a real artifact, and only those."""
import time

import numpy as np
import torch

from edgecut import zoo
from edgecut.codegen.artifact import build_artifact
from edgecut.codegen.load import load
from edgecut.frontend import trace
from edgecut.passes.find_cuts import cut_problem
from edgecut.passes.solve import make_plan
from edgecut.runtime.emulate import SlowDevice
from edgecut.types import Link, PlanTable


def test_slow_device_stretches_segment_time_and_keeps_answers(tmp_path):
    m = zoo.get("tiny_chain")
    x = torch.randn(1, 3, 16, 16)
    gm = trace(m, x)
    for n in gm.graph.nodes:
        n.meta["edgecut.device_s"] = n.meta["edgecut.edge_s"] = 1e-4
    p = cut_problem(gm)
    plan = make_plan(p, p.device_only(), Link(1e6), 1.0, 0.0)
    build_artifact(gm, PlanTable((0.0,), (plan,), 1.0), "local", "local", tmp_path / "a", (x,), onnx=False,
                   progress=False)
    part = load(tmp_path / "a", "device")
    slow = SlowDevice(part, 50)
    inputs = {part.input_names[0]: x.numpy()}

    def timed(p):
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            res = p.run(plan.id, inputs)
            best = min(best, time.perf_counter() - t)
        return best, res

    fast_s, fast = timed(part)
    slow_s, res = timed(slow)
    assert np.array_equal(res.outputs["logits"], fast.outputs["logits"])
    assert np.allclose(res.outputs["logits"], m(x).detach().numpy(), atol=1e-5)
    assert slow_s > 10 * fast_s          # stretched (50x of the segment time, not of Python's)
    assert slow.table is part.table and slow.input_names == part.input_names
    assert timed(part)[0] < slow_s / 10  # the wrapped part itself keeps its speed
