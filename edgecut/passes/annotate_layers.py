"""annotate_layers: classify every node into a layer kind and count its work.

Reads: `meta.SHAPE` (run `annotate_shapes` first).
Writes: `meta.KIND`, `meta.MACS`, `meta.PARAMS`, `meta.PARAM_BYTES`, `meta.IN_ELEMS`,
`meta.FEATURES`, `meta.ATTRS`, `meta.MODULE_TYPE` on every node.

Works on graphs from torch.fx (call_module / torch functions / tensor methods) and from
torch.export (aten ops, in-place or not, any overload, with weights as get_attr nodes; a weight
used by one layer is counted on that layer). Attention counts softmax(q k^T) v as
batch * L * S * (E + Ev) multiply-accumulates (plus the projections for nn.MultiheadAttention). Features are Edgent's (paper's Table 1): conv x1 = input feature-map elements,
x2 = (kernel/stride)^2 * filters; linear and pool x1 = input size, x2 = output size;
relu, lrn, dropout x = input size; other kinds (input size, output size).
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from edgecut.frontend import meta as M

_MODULE_KINDS = [
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), M.CONV),
    ((nn.Linear,), M.LINEAR),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), M.MAXPOOL),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), M.AVGPOOL),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d), M.ADAPTIVE_POOL),
    ((nn.ReLU,), M.RELU),
    ((nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
      nn.ELU, nn.Softmax, nn.LogSoftmax, nn.Hardtanh, nn.Mish, nn.PReLU, nn.Softplus, nn.SELU, nn.CELU,
      nn.GLU), M.ACTIVATION),
    ((nn.LocalResponseNorm,), M.LRN),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout), M.DROPOUT),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), M.BN),
    ((nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.RMSNorm), M.NORM),
    ((nn.MultiheadAttention,), M.ATTENTION),
    ((nn.Flatten, nn.Unflatten, nn.Identity, nn.ZeroPad2d, nn.ConstantPad2d, nn.PixelShuffle,
      nn.ChannelShuffle), M.RESHAPE),
]

# torch-level functions (torch.fx graphs) and the names of aten ops (torch.export graphs: an
# op's name without namespace, overload or in-place underscore, e.g. aten.relu_.default -> relu).
_FN_KINDS = {
    M.CONV: {F.conv1d, F.conv2d, F.conv3d},
    M.LINEAR: {F.linear, torch.matmul, torch.bmm, torch.mm, operator.matmul},
    M.MAXPOOL: {F.max_pool1d, F.max_pool2d},
    M.AVGPOOL: {F.avg_pool1d, F.avg_pool2d},
    M.ADAPTIVE_POOL: {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.mean},
    M.RELU: {torch.relu, F.relu, torch.relu_},
    M.ACTIVATION: {F.relu6, F.hardtanh, torch.sigmoid, torch.tanh, F.gelu, F.silu, F.softmax, F.log_softmax,
                   torch.softmax, F.hardswish, F.hardsigmoid, F.leaky_relu, F.mish, F.elu, F.softplus,
                   F.sigmoid, F.tanh},
    M.LRN: {F.local_response_norm},
    M.DROPOUT: {F.dropout, F.dropout2d},
    M.BN: {F.batch_norm},
    M.NORM: {F.layer_norm, F.group_norm, F.instance_norm},
    M.ATTENTION: {F.scaled_dot_product_attention},
    M.ADD: {operator.add, operator.iadd, torch.add, operator.sub, torch.sub},
    M.MUL: {operator.mul, operator.imul, torch.mul, operator.truediv, torch.div},
    M.CONCAT: {torch.cat, torch.concat, torch.stack},
    M.RESHAPE: {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
                torch.chunk, torch.split, torch.unbind, torch.roll, F.pad, operator.getitem},
}
_FN_TO_KIND = {fn: kind for kind, fns in _FN_KINDS.items() for fn in fns}

_ATEN_KINDS = {
    M.CONV: {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"},
    M.LINEAR: {"linear", "addmm", "mm", "bmm", "matmul", "baddbmm"},
    M.MAXPOOL: {"max_pool1d", "max_pool2d", "max_pool2d_with_indices", "max_pool3d"},
    M.AVGPOOL: {"avg_pool1d", "avg_pool2d", "avg_pool3d"},
    M.ADAPTIVE_POOL: {"adaptive_avg_pool1d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool2d",
                      "mean", "sum", "amax"},
    M.RELU: {"relu"},
    M.ACTIVATION: {"relu6", "hardtanh", "sigmoid", "tanh", "gelu", "silu", "softmax", "_softmax", "log_softmax",
                   "_log_softmax", "hardswish", "hardsigmoid", "leaky_relu", "mish", "elu", "softplus", "erf",
                   "exp", "sqrt", "rsqrt", "pow", "clamp", "clamp_min", "clamp_max", "neg", "abs", "glu"},
    M.DROPOUT: {"dropout", "feature_dropout"},
    M.BN: {"batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm"},
    M.NORM: {"layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "instance_norm", "rms_norm"},
    M.ATTENTION: {"scaled_dot_product_attention"},
    M.ADD: {"add", "sub", "rsub"},
    M.MUL: {"mul", "div"},
    M.CONCAT: {"cat", "concat", "stack"},
    M.RESHAPE: {"flatten", "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "squeeze", "unsqueeze",
                "expand", "select", "slice", "narrow", "unbind", "split", "split_with_sizes", "chunk", "clone",
                "contiguous", "alias", "roll", "pad", "constant_pad_nd", "repeat", "channel_shuffle",
                "pixel_shuffle", "index", "flip", "unflatten"},
}
_ATEN_TO_KIND = {name: kind for kind, names in _ATEN_KINDS.items() for name in names}


def aten_name(target) -> str | None:
    """'relu' for aten.relu_.default, aten.relu.default or aten.relu; None for anything else."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        name = target._schema.name if isinstance(target, torch._ops.OpOverload) else target._qualified_op_name
        ns, _, op = name.partition("::")
        if ns == "aten":
            return op[:-1] if op.endswith("_") and not op.endswith("__") else op
    return None


_METHOD_KINDS = {
    "relu": M.RELU, "relu_": M.RELU, "sigmoid": M.ACTIVATION, "tanh": M.ACTIVATION, "softmax": M.ACTIVATION,
    "sigmoid_": M.ACTIVATION, "exp": M.ACTIVATION, "sqrt": M.ACTIVATION, "clamp": M.ACTIVATION,
    "add": M.ADD, "add_": M.ADD, "sub": M.ADD, "mul": M.MUL, "mul_": M.MUL, "div": M.MUL,
    "matmul": M.LINEAR, "bmm": M.LINEAR,
    "flatten": M.RESHAPE, "view": M.RESHAPE, "reshape": M.RESHAPE, "permute": M.RESHAPE,
    "transpose": M.RESHAPE, "contiguous": M.RESHAPE, "squeeze": M.RESHAPE, "unsqueeze": M.RESHAPE,
    "expand": M.RESHAPE, "repeat": M.RESHAPE, "chunk": M.RESHAPE, "split": M.RESHAPE, "unbind": M.RESHAPE,
    "flip": M.RESHAPE, "roll": M.RESHAPE, "unflatten": M.RESHAPE,
    "mean": M.ADAPTIVE_POOL, "sum": M.ADAPTIVE_POOL, "amax": M.ADAPTIVE_POOL,
}


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _in_elems(n: fx.Node) -> int:
    return sum(M.elements(a.meta.get(M.SHAPE)) for a in n.all_input_nodes if a.op != "get_attr")


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _kind_and_attrs(gm: fx.GraphModule, n: fx.Node) -> tuple[str, dict, str]:
    """(kind, attrs, type name) of node `n`."""
    if n.op == "placeholder":
        return M.INPUT, {}, "input"
    if n.op == "output":
        return M.OUTPUT, {}, "output"
    if n.op == "get_attr":
        return M.PARAM, {}, "get_attr"
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        kind = next((k for types, k in _MODULE_KINDS if isinstance(mod, types)), M.OTHER)
        return _module_attrs(n, mod, kind)
    if n.op == "call_method":
        kind, name = _METHOD_KINDS.get(n.target, M.OTHER), str(n.target)
    else:
        name = getattr(n.target, "__name__", str(n.target))
        kind = _FN_TO_KIND.get(n.target) or _ATEN_TO_KIND.get(aten_name(n.target), M.OTHER)
    kind, attrs = _function_attrs(gm, n, kind)
    return kind, attrs, name


def _module_attrs(n: fx.Node, mod: nn.Module, kind: str) -> tuple[str, dict, str]:
    a: dict = {}
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        a = {"kernel": tuple(mod.kernel_size), "stride": tuple(mod.stride), "groups": mod.groups,
             "dilation": tuple(mod.dilation), "in_channels": mod.in_channels, "out_channels": mod.out_channels}
        if mod.groups > 1 and mod.groups == mod.in_channels:
            kind = M.DWCONV
    elif isinstance(mod, nn.Linear):
        a = {"in_features": mod.in_features, "out_features": mod.out_features}
    elif kind in (M.MAXPOOL, M.AVGPOOL):
        a = {"kernel": _pair(mod.kernel_size), "stride": _pair(mod.stride or mod.kernel_size)}
    elif kind == M.LRN:
        a = {"size": mod.size}
    elif isinstance(mod, nn.MultiheadAttention):
        a = _mha_attrs(n, mod)
    return kind, a, type(mod).__name__


def _shape(a) -> tuple:
    return tuple(a.meta.get(M.SHAPE) or ()) if isinstance(a, fx.Node) else ()


def _attention_attrs(q: tuple, k: tuple, v: tuple) -> dict:
    """softmax(q k^T) v over the last two dims: (..., L, E) x (..., S, E) -> (..., L, Ev)."""
    batch = math.prod(q[:-2])
    return {"batch": batch, "queries": q[-2], "keys": k[-2], "embed": q[-1], "value_embed": v[-1],
            "macs": batch * q[-2] * k[-2] * (q[-1] + v[-1])}


def _mha_attrs(n: fx.Node, mod: nn.MultiheadAttention) -> dict:
    """nn.MultiheadAttention: the q, k, v and output projections plus the attention itself."""
    q, k = _shape(n.args[0] if n.args else n.kwargs.get("query")), _shape(
        n.args[1] if len(n.args) > 1 else n.kwargs.get("key"))
    if len(q) != 3 or len(k) != 3:
        return {}
    (lq, nb), (s, _) = ((q[1], q[0]), (k[1], k[0])) if mod.batch_first else ((q[0], q[1]), (k[0], k[1]))
    e, h = mod.embed_dim, mod.num_heads
    proj = nb * (lq * e * e + s * mod.kdim * e + s * mod.vdim * e + lq * e * e)
    att = _attention_attrs((nb, h, lq, e // h), (nb, h, s, e // h), (nb, h, s, e // h))
    return {**att, "macs": att["macs"] + proj}


def _function_attrs(gm: fx.GraphModule, n: fx.Node, kind: str) -> tuple[str, dict]:
    args = list(n.args)
    if kind == M.CONV and len(args) >= 2 and isinstance(args[1], fx.Node):
        w = args[1].meta.get(M.SHAPE)
        if w is None and args[1].op == "get_attr":
            w = tuple(_attr(gm, args[1].target).shape)
        convolution = aten_name(n.target) in ("convolution", "_convolution")
        stride = _pair(args[3] if len(args) > 3 else n.kwargs.get("stride", 1))
        dilation = _pair(args[5] if len(args) > 5 else n.kwargs.get("dilation", 1))
        groups = args[8] if convolution and len(args) > 8 else (args[6] if len(args) > 6 and not convolution
                                                                 else n.kwargs.get("groups", 1))
        cin = n.args[0].meta[M.SHAPE][1]
        a = {"kernel": tuple(w[2:]), "stride": stride[: len(w) - 2], "groups": int(groups),
             "dilation": dilation[: len(w) - 2], "in_channels": cin, "out_channels": w[0]}
        return (M.DWCONV if 1 < a["groups"] == cin else kind), a
    if kind == M.LINEAR and n.meta.get(M.SHAPE):
        src = n.args[1] if aten_name(n.target) in ("addmm", "baddbmm") else n.args[0]
        return kind, {"in_features": _shape(src)[-1], "out_features": n.meta[M.SHAPE][-1]}
    if kind == M.ATTENTION and len(args) >= 3:
        return kind, _attention_attrs(_shape(args[0]), _shape(args[1]), _shape(args[2]))
    if kind in (M.MAXPOOL, M.AVGPOOL) and len(args) >= 2:
        k = _pair(args[1])
        s = args[2] if len(args) > 2 and args[2] else n.kwargs.get("stride") or k
        return kind, {"kernel": k, "stride": _pair(s)}
    if kind == M.LRN and len(args) >= 2:
        return kind, {"size": int(args[1])}
    return kind, {}


def _macs(kind: str, attrs: dict, out_elems: int, in_elems: int) -> int:
    if kind in (M.CONV, M.DWCONV):
        return out_elems * (attrs["in_channels"] // attrs["groups"]) * math.prod(attrs["kernel"])
    if kind == M.LINEAR:
        return out_elems * attrs["in_features"]
    if kind == M.AVGPOOL:
        return out_elems * math.prod(attrs.get("kernel", (1,)))
    if kind == M.ADAPTIVE_POOL:
        return in_elems
    if kind == M.LRN:
        return out_elems * attrs.get("size", 1)
    if kind in (M.BN, M.MUL, M.NORM):
        return out_elems
    if kind == M.ATTENTION:
        return attrs.get("macs", 0)
    return 0


def _features(kind: str, attrs: dict, in_elems: int, out_elems: int) -> tuple:
    if kind in (M.CONV, M.DWCONV):
        ratio = math.prod(attrs["kernel"]) / math.prod(attrs["stride"])
        return (float(in_elems), float(ratio * attrs["out_channels"]))
    if kind in (M.LINEAR, M.MAXPOOL, M.AVGPOOL, M.ADAPTIVE_POOL):
        return (float(in_elems), float(out_elems))
    if kind in (M.RELU, M.LRN, M.DROPOUT):
        return (float(in_elems),)
    return (float(in_elems), float(out_elems))


def annotate_layers(gm: fx.GraphModule) -> fx.GraphModule:
    """Fill kind, MACs, params, Edgent features and layer attributes of every node."""
    owner = _param_owners(gm)
    for n in gm.graph.nodes:
        kind, attrs, type_name = _kind_and_attrs(gm, n)
        in_elems = 0 if n.op in ("placeholder", "get_attr") else _in_elems(n)
        out_elems = M.elements(n.meta.get(M.SHAPE)) if n.op != "output" else 0
        if n.op == "output":
            in_elems = 0
        params = _own_params(gm, n, owner)
        n.meta[M.KIND] = kind
        n.meta[M.ATTRS] = attrs
        n.meta[M.MODULE_TYPE] = type_name
        n.meta[M.IN_ELEMS] = in_elems
        n.meta[M.MACS] = int(_macs(kind, attrs, out_elems, in_elems))
        n.meta[M.PARAMS] = int(sum(p.numel() for p in params))
        n.meta[M.PARAM_BYTES] = int(sum(p.numel() * p.element_size() for p in params))
        n.meta[M.FEATURES] = _features(kind, attrs, in_elems, out_elems)
        if n.op in ("get_attr", "output") or n.meta.get(M.SHAPE) is None:
            n.meta.setdefault(M.SHAPE, None)
    return gm


def _param_owners(gm: fx.GraphModule) -> dict[str, str]:
    """get_attr node name -> the single compute node that uses it (export graphs)."""
    owners = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and len(n.users) == 1:
            (user,) = n.users
            if user.op in ("call_function", "call_module"):
                owners[n.name] = user.name
    return owners


def _own_params(gm: fx.GraphModule, n: fx.Node, owner: dict[str, str]) -> list[torch.Tensor]:
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        return list(mod.parameters()) + [b for b in mod.buffers() if b.is_floating_point()
                                         and not isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))]
    if n.op == "get_attr":
        if n.name in owner:
            return []
        v = _attr(gm, n.target)
        return [v] if isinstance(v, nn.Parameter) else []
    return [_attr(gm, a.target) for a in n.all_input_nodes
            if a.op == "get_attr" and owner.get(a.name) == n.name and isinstance(_attr(gm, a.target), nn.Parameter)]
