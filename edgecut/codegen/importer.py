"""import_segment: one fx segment -> a Relax IRModule whose `main` takes the inputs then the weights.

Two importers, tried in order:

1. torch.export + TVM's `from_exported_program` (covers core ATen: convolutions, batch and layer
   norm, attention, GELU/SiLU/hardswish, permutes...). The segment GraphModule (torch.fx level with
   call_module nodes, or ATen level with get_attr weights when the frontend fell back to
   torch.export) is exported as is; only the ATen ops TVM's importer has no converter for are
   decomposed (`run_decompositions` with just those entries of torch's default table), so ops TVM
   imports whole (scaled_dot_product_attention, layer_norm, batch_norm) stay whole and the BN fold
   of `build.prepare` still sees `batch_norm(conv2d(...))`.
2. TVM's torch.fx importer (`from_fx`) with converters for modules it lacks
   (`nn.LocalResponseNorm`, Edgent's AlexNet).

Weights stay inputs (`keep_params_as_input`, `detach_params`); buffers (BN statistics) come as
constants, which `build.prepare` turns into trailing weights. When neither importer takes the
segment, `ImportFailed` names the op and node; `build_artifact` then runs that segment on ONNX
Runtime. `EDGECUT_FAIL_IMPORT` (comma-separated segment names) makes the import of those
segments fail on purpose: the test hook for that fallback path.
"""
from __future__ import annotations

import os

import torch
import torch.fx as fx
from torch import nn

from edgecut.errors import CodegenError

FAIL_IMPORT_ENV = "EDGECUT_FAIL_IMPORT"


class ImportFailed(CodegenError):
    """Neither TVM importer takes a segment. `op`, `node`: the first op it refused and where."""

    def __init__(self, message: str, op: str = "", node: str = ""):
        super().__init__(message)
        self.op, self.node = op, node


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


def _aten_batch_norm(node: fx.Node, importer):
    """aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps,
    cudnn_enabled) in inference: TVM 0.27 maps `batch_norm.default` as if it had the
    `_native_batch_norm_legit_no_training` signature (eps read from `momentum`, training=True)."""
    import numpy as np
    from tvm import relax

    args = list(node.args) + [None] * (9 - len(node.args))
    x = importer.env[args[0]]
    channel, dtype = int(importer.shape_of(x)[1]), x.ty.dtype.dtype

    def arg(i, fill):
        return importer.env[args[i]] if args[i] is not None else relax.const(np.full(channel, fill), dtype)

    eps = args[7] if args[7] is not None else node.kwargs.get("eps", 1e-5)
    if args[5]:                       # training: the batch's own statistics (NF-Nets standardize
        return _batch_stats_norm(importer, x, args, float(eps))   # weights this way), no running ones
    bn = importer.block_builder.emit(relax.op.nn.batch_norm(
        x, arg(1, 1.0), arg(2, 0.0), arg(3, 0.0), arg(4, 1.0), axis=1,
        epsilon=float(eps), scale=args[1] is not None, center=args[2] is not None, training=False))
    return importer.block_builder.emit(bn[0])


def _batch_stats_norm(importer, x, args, eps: float):
    """batch_norm(training=True): (x - mean) / sqrt(var + eps) * weight + bias, mean and biased
    variance over every axis but the channel (1). Running statistics are not updated: compiled
    code is inference."""
    from tvm import relax

    bb = importer.block_builder
    ndim = len(importer.shape_of(x))
    axes = [a for a in range(ndim) if a != 1]
    mean = bb.emit(relax.op.mean(x, axes, keepdims=True))
    var = bb.emit(relax.op.variance(x, axes, keepdims=True))
    y = bb.emit(relax.op.divide(relax.op.subtract(x, mean), relax.op.sqrt(
        relax.op.add(var, relax.const(eps, x.ty.dtype.dtype)))))
    shape = [1, -1] + [1] * (ndim - 2)
    if args[1] is not None:
        y = bb.emit(relax.op.multiply(y, relax.op.reshape(importer.env[args[1]], shape)))
    if args[2] is not None:
        y = bb.emit(relax.op.add(y, relax.op.reshape(importer.env[args[2]], shape)))
    return y


def _aten_to_device(node: fx.Node, importer):
    """aten.to.device(x, device, dtype, ...): compiled code has one device, so only the dtype
    matters (TVM 0.27 has no converter; timm's EdgeNeXt writes `.to(x.device, dtype)`)."""
    from tvm import relax

    x = importer.env[node.args[0]]
    dtype = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
    if dtype is None:
        return x
    want = str(dtype).replace("torch.", "")
    return x if want == x.ty.dtype.dtype else importer.block_builder.emit(relax.op.astype(x, want))


def _aten_rounded_divide(node: fx.Node, importer):
    """floor_divide(x, y) and div(x, y, rounding_mode=...) with a Python number on either side
    taking the tensor's dtype: TVM 0.27 makes `x // 2` of a float tensor int32 on the right and
    refuses it (timm's XCiT and EdgeNeXt positional encodings: `dim_t // 2` of a float arange)."""
    from tvm import relax

    def operand(a, like):
        if isinstance(a, fx.Node):
            return importer.env[a]
        return relax.const(a, like.ty.dtype.dtype)

    a, b = node.args[:2]
    tensor = importer.env[a] if isinstance(a, fx.Node) else importer.env[b]
    x, y = operand(a, tensor), operand(b, tensor)
    mode = node.kwargs.get("rounding_mode", "floor") if "Tensor_mode" in str(node.target) else "floor"
    if mode == "floor":
        return importer.block_builder.emit(relax.op.floor_divide(x, y))
    q = importer.block_builder.emit(relax.op.divide(x, y))
    return q if mode is None else importer.block_builder.emit(relax.op.trunc(q))


def _nearest_indices(in_size: int, out_size: int, scale, exact: bool):
    """The source row of each output row, as PyTorch's CPU kernel computes it (UpSample.h):
    float32 `floor(dst * s)` (`floor((dst + 0.5) * s)` for nearest-exact), clamped to the last
    row, with s = 1 / scale_factor when one was given and in / out otherwise."""
    import numpy as np

    s = np.float32(1.0 / scale) if scale else np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32) + (np.float32(0.5) if exact else np.float32(0))
    return np.minimum(np.floor(dst * s).astype(np.int64), in_size - 1)


def _aten_upsample_nearest(node: fx.Node, importer):
    """upsample_nearest{1,2,3}d.vec(x, output_size, scale_factors) and the nearest-exact ones as
    a gather per spatial axis. TVM 0.27 maps them to resize2d with half-pixel rounding, which
    picks other rows than PyTorch whenever the scale is not a whole number (GhostNetV2's
    attention gate, 3 -> 7: 0.3x the output's scale off)."""
    import numpy as np
    from tvm import relax

    x = importer.env[node.args[0]]
    shape = [int(d) for d in importer.shape_of(x)]
    spatial = len(shape) - 2
    size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
    scales = node.args[2] if len(node.args) > 2 else node.kwargs.get("scale_factors")
    scales = [None] * spatial if scales is None else (list(scales) if isinstance(scales, (list, tuple))
                                                      else [scales] * spatial)
    if size is None:
        size = [int(np.floor(shape[2 + i] * float(scales[i]))) for i in range(spatial)]
    exact = "exact" in str(node.target)
    for i in range(spatial):
        if int(size[i]) == shape[2 + i] and not scales[i]:
            continue
        idx = _nearest_indices(shape[2 + i], int(size[i]), scales[i], exact)
        x = importer.block_builder.emit(relax.op.take(x, relax.const(idx.astype("int64")), axis=2 + i, mode="clip"))
    return x


# converters that replace TVM's for ATen ops it gets wrong, or add ones it lacks
_EXPORT_CONVERTERS = {"batch_norm.default": _aten_batch_norm, "to.device": _aten_to_device,
                      "floor_divide.default": _aten_rounded_divide, "div.Tensor_mode": _aten_rounded_divide,
                      **{f"{op}{d}d.vec": _aten_upsample_nearest for op in ("upsample_nearest", "_upsample_nearest_exact")
                         for d in (1, 2, 3)}}


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _ep_missing(ep, convert) -> list[tuple[str, str]]:
    """(ATen op, node name) of every call in `ep` that the exported-program importer lacks."""
    return [(n.target.__name__, n.name) for n in ep.graph.nodes
            if n.op == "call_function" and getattr(n.target, "__name__", None) not in convert]


def _source_node(node_name: str, n_meta: dict, default: str) -> str:
    """The segment's fx node an exported node came from (torch.export keeps `from_node`)."""
    for src in n_meta.get("from_node") or ():
        name = getattr(src, "name", None)
        if name:
            return name
    return default


def export_segment_program(gm: fx.GraphModule, example_args):
    """torch.export of the segment `gm` with only the ops TVM lacks decomposed; returns
    (ExportedProgram, [(op, node)] still missing)."""
    from torch.export import default_decompositions
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    convert = {**ExportedProgramImporter().convert_map, **_EXPORT_CONVERTERS}   # what we convert too
    with torch.no_grad():
        ep = torch.export.export(gm, tuple(example_args), strict=False)
    table_all = default_decompositions()
    for _ in range(4):
        missing = _ep_missing(ep, convert)
        if not missing:
            break
        ops = {n.target for n in ep.graph.nodes if n.op == "call_function"
               and getattr(n.target, "__name__", None) in {m for m, _ in missing}}
        table = {op: table_all[op] for op in ops if op in table_all}
        if not table:
            break
        ep = ep.run_decompositions(table)
    nodes = {n.name: n for n in ep.graph.nodes}
    missing = [(op, _source_node(node, nodes[node].meta, node)) for op, node in _ep_missing(ep, convert)]
    return ep, missing


_POOLS = {"max_pool1d.default", "max_pool2d.default", "max_pool3d.default", "avg_pool1d.default",
          "avg_pool2d.default", "avg_pool3d.default", "max_pool2d_with_indices.default"}


def _normalize_args(ep) -> None:
    """Arguments TVM's converters misread, spelled out: a pool's empty stride ([] means the
    kernel size in ATen; TVM reads it as no stride at all)."""
    for n in ep.graph.nodes:
        if getattr(n.target, "__name__", "") in _POOLS and len(n.args) > 2 and not n.args[2]:
            n.args = (*n.args[:2], n.args[1], *n.args[3:])


def _import_exported(gm, example_args):
    from tvm.relax.frontend.torch import from_exported_program

    ep, missing = export_segment_program(gm, example_args)
    _normalize_args(ep)
    if missing:
        op, node = missing[0]
        raise ImportFailed(f"TVM's exported-program importer does not support {op} at node {node!r}",
                           op, node)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return from_exported_program(ep, keep_params_as_input=True, run_ep_decomposition=False,
                                 unwrap_unit_return_tuple=not isinstance(out, (tuple, list)),
                                 custom_convert_map=_EXPORT_CONVERTERS)   # a tensor stays a tensor, as from_fx


def _import_fx(gm, input_specs):
    bad = unsupported(gm)
    if bad:
        op, node = bad[0]
        raise ImportFailed(f"TVM's fx importer does not support {op} at node {node!r}", op, node)
    info = [(tuple(int(d) for d in shape), str(dtype)) for shape, dtype in input_specs]
    return _importer().from_fx(gm, info, True, False, False)


def _positive_squeeze_axes(mod):
    """squeeze with negative axes (from_exported_program writes them for nn.MultiheadAttention)
    -> the same axes counted from the front: ConvertLayout's layout inference for squeeze raises
    std::bad_alloc on a negative axis in TVM 0.27."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    squeeze = tvm.ir.Op.get("relax.squeeze")

    @mutator
    class Positive(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(squeeze)) or call.attrs.axis is None:
                return call
            axes = [int(a) for a in call.attrs.axis]
            if all(a >= 0 for a in axes):
                return call
            ndim = len(call.args[0].ty.shape)
            return relax.op.squeeze(call.args[0], [a + ndim if a < 0 else a for a in axes])

    mod["main"] = Positive(mod).visit_expr(mod["main"])
    return mod


def import_segment(gm: fx.GraphModule, input_specs, *, name: str = "", example_inputs=None
                   ) -> tuple[object, list]:
    """Relax IRModule and weights (numpy arrays, in `main`'s order after the inputs) of `gm`.

    `input_specs`: one (shape, dtype) per placeholder, in order; `example_inputs` (arrays of
    those shapes) for torch.export (zeros when omitted). Raises ImportFailed naming the op."""
    import numpy as np
    from tvm.relax.frontend import detach_params

    where = f" (segment {name})" if name else ""
    if name and name in os.environ.get(FAIL_IMPORT_ENV, "").split(","):
        raise ImportFailed(f"import of segment {name} refused on request ({FAIL_IMPORT_ENV})",
                           "test hook", name)
    if example_inputs is None:
        example_inputs = [np.zeros(tuple(s), dtype=str(d)) for s, d in input_specs]
    args = [torch.tensor(np.asarray(x)) for x in example_inputs]   # copies: nothing may touch the caller's
    errors, first = [], None
    has_lrn = any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.LocalResponseNorm)
                  for n in gm.graph.nodes)
    attempts = [("torch.export", lambda: _import_exported(gm, args)),
                ("fx", lambda: _import_fx(gm, input_specs))]
    if has_lrn:                          # the fx importer has edgecut's LRN converter
        attempts.reverse()
    for how, attempt in attempts:
        try:
            mod = attempt()
            break
        except Exception as e:  # noqa: BLE001 - every importer's refusal is reported together
            errors.append(f"{how}: {_first_line(e)}")
            if first is None and isinstance(e, ImportFailed):
                first = e
    else:
        op, node = (first.op, first.node) if first is not None else ("", "")
        raise ImportFailed(f"TVM could not import{where or ' the graph'} ({'; '.join(errors)})", op, node)
    mod, params = detach_params(_positive_squeeze_axes(mod))
    return mod, [p.numpy() for p in params.get("main", [])]
