"""The transpose rule: tiles along the axis read contiguously; exact against numpy for layouts
the models produce (NCHW <-> NHWC) and odd ones, and through `build` against torch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgecut.codegen.schedules.injective import read_contiguous_axis, schedule_injective
from vmrun import import_relax, run_built


def _transpose_func(shape, perm):
    from tvm import te

    a = te.placeholder(shape, name="A")
    out = te.compute([shape[p] for p in perm],
                     lambda *i: a[tuple(i[perm.index(k)] for k in range(len(shape)))], name="T")
    return te.create_prim_func([a, out])


@pytest.mark.parametrize("shape,perm,axis", [
    ((1, 3, 224, 224), (0, 2, 3, 1), 2),    # the input NCHW -> NHWC: vectors along W
    ((1, 28, 28, 64), (0, 3, 1, 2), 1),     # an NHWC output back to NCHW: vectors along C
    ((2, 5, 6, 7), (3, 1, 0, 2), 0),        # read along 7 elements: no vector, flat rule
    ((4, 32), (1, 0), 0),
    ((1, 8, 8, 16), (0, 1, 2, 3), -1),      # a copy is no transpose
])
def test_transpose_rule_is_exact(shape, perm, axis):
    import tvm
    from tvm import s_tir

    from edgecut import targets

    sch = s_tir.Schedule(tvm.IRModule({"main": _transpose_func(shape, perm)}))
    block = sch.get_sblock("T")
    assert read_contiguous_axis(sch, block) == axis
    schedule_injective(sch, block, 16)
    if axis >= 0 and shape[perm[axis]] % 2 == 0:
        assert "vectorized" in sch.mod.script() or "T.vectorized" in sch.mod.script()
    lib = tvm.compile(sch.mod["main"].with_attr("global_symbol", "main"),
                      target=targets.get("local").tvm_target()).jit()
    a = np.random.default_rng(0).standard_normal(shape).astype("float32")
    out = tvm.runtime.tensor(np.zeros([shape[p] for p in perm], "float32"))
    lib["main"](tvm.runtime.tensor(a), out)
    np.testing.assert_array_equal(out.numpy(), a.transpose(perm))


class PermuteScale(nn.Module):
    def forward(self, x):
        return (x.permute(0, 2, 3, 1) * 2.0).permute(0, 3, 1, 2).contiguous() + 1.0


def test_transposes_in_a_built_model_match_torch():
    from edgecut.codegen.build import build

    model = nn.Sequential(PermuteScale(), nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU()).eval()
    shape = (1, 3, 40, 48)
    mod, params = import_relax(model, shape)
    built = build(mod, params["main"], "local", tuning_dir=False)
    x = np.random.default_rng(1).standard_normal(shape).astype("float32")
    out = run_built(built, x)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert float(np.abs(out - ref).max()) <= 1e-4 * float(np.abs(ref).max())
