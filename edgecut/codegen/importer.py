"""import_segment: one fx segment -> a Relax IRModule whose `main` takes the inputs then the weights.

Uses TVM's torch.fx importer (`tvm.relax.frontend.torch.from_fx`, weights kept as inputs and
detached with `detach_params`), with converters for modules the importer lacks
(`nn.LocalResponseNorm`, used by Edgent's AlexNet). An op it cannot import is reported with the
op and the node, and the way around it: `backend="onnxruntime"`.
"""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from edgecut.errors import CodegenError


def _lrn(importer, node: fx.Node):
    """torch's LocalResponseNorm: x / (k + alpha * mean_{size channels}(x^2)) ** beta, the
    channel window as an average pool over a (N, 1, C, rest) view, zero padded."""
    from tvm import relax

    mod: nn.LocalResponseNorm = importer.named_modules[node.target]
    x = importer.env[node.args[0]]
    shape = [int(d) for d in x.ty.shape]
    bb = importer.block_builder
    rest = 1
    for d in shape[2:]:
        rest *= d
    sq = bb.emit(relax.op.multiply(x, x))
    sq = bb.emit(relax.op.reshape(sq, (shape[0], 1, shape[1], rest)))
    avg = bb.emit(relax.op.nn.avg_pool2d(sq, pool_size=(mod.size, 1), strides=(1, 1),
                                         padding=(mod.size // 2, 0, (mod.size - 1) // 2, 0),
                                         count_include_pad=True))
    avg = bb.emit(relax.op.reshape(avg, shape))
    dt = x.ty.dtype
    div = bb.emit(relax.op.power(relax.op.add(relax.op.multiply(avg, relax.const(mod.alpha, dt)),
                                              relax.const(mod.k, dt)), relax.const(mod.beta, dt)))
    return bb.emit(relax.op.divide(x, div))


_EXTRA_MODULES = {nn.LocalResponseNorm: _lrn}


def _importer():
    from tvm.relax.frontend.torch.fx_translator import TorchFXImporter

    imp = TorchFXImporter()
    for cls, fn in _EXTRA_MODULES.items():
        imp.convert_map[cls] = (lambda f: (lambda node: f(imp, node)))(fn)
    return imp


def _op_name(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)).__name__
    return getattr(n.target, "__name__", str(n.target))


def unsupported(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(op, node name) of every node TVM's fx importer has no converter for."""
    convert = _importer().convert_map
    bad = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            ok = type(gm.get_submodule(n.target)) in convert
        elif n.op == "call_function":
            ok = getattr(n.target, "__name__", None) in convert
        elif n.op == "call_method":
            ok = n.target in convert
        else:
            ok = True
        if not ok:
            bad.append((_op_name(gm, n), n.name))
    return bad


def _error(bad, where: str) -> CodegenError:
    op, node = bad[0]
    more = f" (and {len(bad) - 1} more: {', '.join(f'{o} at {m!r}' for o, m in bad[1:4])})" if len(bad) > 1 else ""
    return CodegenError(f"TVM's importer does not support {op} at node {node!r}{where}{more}; "
                        "build this model with backend=\"onnxruntime\" (ONNX Runtime instead of TVM), "
                        "or replace the op")


def import_segment(gm: fx.GraphModule, input_specs, *, name: str = "") -> tuple[object, list]:
    """Relax IRModule and weights (numpy arrays, in `main`'s order after the inputs) of `gm`.

    `input_specs`: one (shape, dtype) per placeholder, in order."""
    from tvm.relax.frontend import detach_params

    where = f" (segment {name})" if name else ""
    bad = unsupported(gm)
    if bad:
        raise _error(bad, where)
    info = [(tuple(int(d) for d in shape), str(dtype)) for shape, dtype in input_specs]
    try:
        mod = _importer().from_fx(gm, info, True, False, False)
    except Exception as e:
        raise CodegenError(f"TVM could not import{where or ' the graph'}: {type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}; "
                           "try backend=\"onnxruntime\"") from e
    mod, params = detach_params(mod)
    return mod, [p.numpy() for p in params.get("main", [])]
