"""Helpers shared by the codegen tests: import a torch model into Relax, run a `Built` in the VM."""
import numpy as np


def run_built(built, x: np.ndarray) -> np.ndarray:
    """The executable's (first) output for input `x`, as numpy."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(p) for p in built.params])
    return out.numpy() if hasattr(out, "numpy") else out[0].numpy()


def import_relax(model, shape):
    """(module, params) of `model` traced by torch.fx for one float32 input of `shape`, weights
    kept as inputs (what `codegen.build.build` takes)."""
    import torch
    import tvm.relax.frontend.torch  # noqa: F401
    from tvm import relax

    mod = relax.frontend.torch.from_fx(torch.fx.symbolic_trace(model), [(shape, "float32")],
                                       keep_params_as_input=True)
    return relax.frontend.detach_params(mod)
