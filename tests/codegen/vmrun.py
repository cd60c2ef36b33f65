"""Run a `codegen.build.Built` in the Relax VM (shared by the codegen tests)."""
import numpy as np


def run_built(built, x: np.ndarray) -> np.ndarray:
    """The executable's (first) output for input `x`, as numpy."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(p) for p in built.params])
    return out.numpy() if hasattr(out, "numpy") else out[0].numpy()
