"""build: a Relax IRModule (weights as inputs) -> a compiled executable for one `Target`.

This is the single place that decides how edgecut's generated code is optimised; profiling
(costmodel), codegen of artifacts and the benchmarks all call `build`, so predictions describe
the deployed code.

Contract: `mod["main"]` takes the model inputs first, then the weights (as produced by
`relax.frontend.torch.from_fx(..., keep_params_as_input=True)` and `detach_params`). `build`
returns the executable plus the weights *as the executable wants them* (any layout transform is
done here, once, at compile time); at run time call `main(*inputs, *built.params)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecut import targets as _targets
from edgecut.targets import Target


@dataclass
class Built:
    executable: object          # tvm.relax.VMExecutable
    params: list                # list[np.ndarray], in the order main expects after the inputs
    target: Target
    num_inputs: int


def build(mod, params, target: Target | str, *, num_inputs: int = 1) -> Built:
    """Compile `mod` for `target` (default TVM pipeline for now)."""
    import tvm

    t = _targets.get(target)
    ex = tvm.compile(mod, target=t.tvm_target())
    return Built(ex, [np.asarray(p.numpy() if hasattr(p, "numpy") else p) for p in params], t, num_inputs)
