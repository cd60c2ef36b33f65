"""annotate_layers: classify every node into a layer kind and count its work.

Reads: `meta.SHAPE` (run `annotate_shapes` first).
Writes: `meta.KIND`, `meta.MACS`, `meta.PARAMS`, `meta.PARAM_BYTES`, `meta.IN_ELEMS`,
`meta.FEATURES`, `meta.ATTRS`, `meta.MODULE_TYPE` on every node.

Works on graphs from torch.fx (call_module / torch functions / tensor methods) and from
torch.export (aten ops with weights as get_attr nodes; a weight used by one layer is counted
on that layer). Features are Edgent's (paper's Table 1): conv x1 = input feature-map elements,
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

_aten = torch.ops.aten

_MODULE_KINDS = [
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), M.CONV),
    ((nn.Linear,), M.LINEAR),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), M.MAXPOOL),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), M.AVGPOOL),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d), M.ADAPTIVE_POOL),
    ((nn.ReLU,), M.RELU),
    ((nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
      nn.ELU, nn.Softmax, nn.LogSoftmax, nn.Hardtanh, nn.Mish, nn.PReLU), M.ACTIVATION),
    ((nn.LocalResponseNorm,), M.LRN),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout), M.DROPOUT),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), M.BN),
    ((nn.Flatten, nn.Unflatten, nn.Identity), M.RESHAPE),
]

_FN_KINDS = {
    M.CONV: {F.conv1d, F.conv2d, F.conv3d, _aten.conv2d, _aten.conv1d, _aten.convolution, _aten.conv2d.default,
             _aten.convolution.default, _aten.conv1d.default},
    M.LINEAR: {F.linear, _aten.linear, _aten.linear.default, _aten.addmm, _aten.addmm.default, torch.matmul,
               _aten.mm.default, _aten.matmul.default},
    M.MAXPOOL: {F.max_pool1d, F.max_pool2d, _aten.max_pool2d, _aten.max_pool2d.default,
                _aten.max_pool2d_with_indices.default},
    M.AVGPOOL: {F.avg_pool1d, F.avg_pool2d, _aten.avg_pool2d.default},
    M.ADAPTIVE_POOL: {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                      _aten.adaptive_avg_pool2d.default, _aten._adaptive_avg_pool2d.default},
    M.RELU: {torch.relu, F.relu, torch.relu_, _aten.relu.default, _aten.relu_.default},
    M.ACTIVATION: {F.relu6, F.hardtanh, torch.sigmoid, torch.tanh, F.gelu, F.silu, F.softmax, F.log_softmax,
                   torch.softmax, F.hardswish, F.leaky_relu, _aten.hardtanh.default, _aten.hardtanh_.default,
                   _aten.sigmoid.default, _aten.tanh.default, _aten.gelu.default, _aten.silu.default,
                   _aten._softmax.default, _aten.softmax.int, _aten.hardswish.default, _aten.relu6.default},
    M.LRN: {F.local_response_norm},
    M.DROPOUT: {F.dropout, F.dropout2d, _aten.dropout.default},
    M.BN: {F.batch_norm, _aten.batch_norm.default, _aten._native_batch_norm_legit_no_training.default},
    M.ADD: {operator.add, operator.iadd, torch.add, operator.sub, torch.sub, _aten.add.Tensor, _aten.add_.Tensor,
            _aten.sub.Tensor},
    M.MUL: {operator.mul, operator.imul, torch.mul, operator.truediv, torch.div, _aten.mul.Tensor,
            _aten.div.Tensor},
    M.CONCAT: {torch.cat, torch.concat, torch.stack, _aten.cat.default},
    M.RESHAPE: {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
                _aten.flatten.using_ints, _aten.view.default, _aten.reshape.default, _aten.permute.default,
                _aten.squeeze.dim, _aten.unsqueeze.default, _aten.t.default, _aten.clone.default,
                _aten.contiguous.default, _aten._unsafe_view.default},
}
_FN_TO_KIND = {fn: kind for kind, fns in _FN_KINDS.items() for fn in fns}

_METHOD_KINDS = {
    "relu": M.RELU, "relu_": M.RELU, "sigmoid": M.ACTIVATION, "tanh": M.ACTIVATION, "softmax": M.ACTIVATION,
    "add": M.ADD, "add_": M.ADD, "sub": M.ADD, "mul": M.MUL, "mul_": M.MUL, "div": M.MUL,
    "flatten": M.RESHAPE, "view": M.RESHAPE, "reshape": M.RESHAPE, "permute": M.RESHAPE,
    "transpose": M.RESHAPE, "contiguous": M.RESHAPE, "squeeze": M.RESHAPE, "unsqueeze": M.RESHAPE,
    "mean": M.ADAPTIVE_POOL,
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
        return _module_attrs(mod, kind)
    if n.op == "call_method":
        return _METHOD_KINDS.get(n.target, M.OTHER), {}, str(n.target)
    kind = _FN_TO_KIND.get(n.target, M.OTHER)
    name = getattr(n.target, "__name__", str(n.target))
    return kind, _function_attrs(gm, n, kind), name


def _module_attrs(mod: nn.Module, kind: str) -> tuple[str, dict, str]:
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
    return kind, a, type(mod).__name__


def _function_attrs(gm: fx.GraphModule, n: fx.Node, kind: str) -> dict:
    args = list(n.args)
    if kind == M.CONV and len(args) >= 2 and isinstance(args[1], fx.Node):
        w = args[1].meta.get(M.SHAPE)
        if w is None and args[1].op == "get_attr":
            w = tuple(_attr(gm, args[1].target).shape)
        stride = _pair(args[3] if len(args) > 3 else n.kwargs.get("stride", 1))
        groups = args[8] if n.target in (_aten.convolution, _aten.convolution.default) and len(args) > 8 else (
            args[6] if len(args) > 6 else n.kwargs.get("groups", 1))
        cin = n.args[0].meta[M.SHAPE][1]
        a = {"kernel": tuple(w[2:]), "stride": stride[: len(w) - 2], "groups": int(groups),
             "in_channels": cin, "out_channels": w[0]}
        return a
    if kind == M.LINEAR and n.meta.get(M.SHAPE):
        return {"in_features": n.args[0].meta[M.SHAPE][-1] if n.target not in (
            _aten.addmm, _aten.addmm.default) else n.args[1].meta[M.SHAPE][-1], "out_features": n.meta[M.SHAPE][-1]}
    if kind in (M.MAXPOOL, M.AVGPOOL) and len(args) >= 2:
        k = _pair(args[1])
        s = args[2] if len(args) > 2 and args[2] else n.kwargs.get("stride") or k
        return {"kernel": k, "stride": _pair(s)}
    if kind == M.LRN and len(args) >= 2:
        return {"size": int(args[1])}
    return {}


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
    if kind in (M.BN, M.MUL):
        return out_elems
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
