"""The codecs' base steps as torch arithmetic inside a segment, so TVM fuses them like any op.

A coded plan's device segment returns its crossing tensors coded (`codecs.coded_name`: fp16, or
int8 = clamp(round(x * inv_scale + zero_point), -128, 127)) and its edge segment reads them coded
and decodes first ((q - zero_point) * scale, or a cast). `apply_codecs` rewrites a segment's
GraphModule accordingly: the int8 parameters are buffers of the segment (constants to TVM's
importer and the ONNX exporter, so the ONNX copies carry the same steps). Reads
`gm.meta[meta.CODEC_SCALES]` (int8 scales per crossing node, written by `compile`).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

import numpy as np

from edgecut import codecs
from edgecut.codecs import Affine, split_name
from edgecut.codegen.manifest import max_error
from edgecut.errors import CodegenError
from edgecut.frontend import meta


def _affine(scales: dict, node: str) -> Affine:
    if node not in scales:
        raise CodegenError(f"crossing tensor {node!r} is coded int8 but has no calibrated scales; "
                           "compile with codecs and data (the scales come from the training data)")
    return Affine.from_dict(scales[node])


def _const(gm: fx.GraphModule, g: fx.Graph, name: str, value) -> fx.Node:
    attr = f"_edgecut_codec_{name}"
    gm.register_buffer(attr, torch.as_tensor(value, dtype=torch.float32).clone())
    return g.get_attr(attr)


def _encode(gm, g, x: fx.Node, node: str, base: str, scales: dict) -> fx.Node:
    if base == "fp16":
        return g.call_method("to", (x, torch.float16))
    a = _affine(scales, node)
    y = g.call_function(operator.add, (g.call_function(operator.mul, (x, _const(gm, g, f"{node}_inv", a.inv_scale))),
                                       _const(gm, g, f"{node}_zp", a.zero_point)))
    y = g.call_function(torch.clamp, (g.call_function(torch.round, (y,)), -128.0, 127.0))
    return g.call_method("to", (y, torch.int8))


def _decode(gm, g, q: fx.Node, node: str, base: str, scales: dict) -> fx.Node:
    x = g.call_method("to", (q, torch.float32))
    if base == "fp16":
        return x
    a = _affine(scales, node)
    x = g.call_function(operator.sub, (x, _const(gm, g, f"{node}_zp", a.zero_point)))
    return g.call_function(operator.mul, (x, _const(gm, g, f"{node}_scale", a.scale)))


def apply_codecs(seg_gm: fx.GraphModule, root: fx.GraphModule) -> fx.GraphModule:
    """Decode after every coded placeholder of `seg_gm`, encode before every coded output (names
    from `codecs.coded_name`; `segment_module` gives such a placeholder the raw node's users and
    returns the raw value in a coded output's place). A segment without coded names is returned
    as it is."""
    g = seg_gm.graph
    scales = root.meta.get(meta.CODEC_SCALES) or {}
    out = next(n for n in g.nodes if n.op == "output")
    changed = False
    for ph in [n for n in g.nodes if n.op == "placeholder"]:
        node, base = split_name(ph.target)
        if base == "fp32":
            continue
        users = list(ph.users)
        with g.inserting_before(ph.next):                   # in order, right after the placeholder
            dec = _decode(seg_gm, g, ph, node, base, scales)
        for u in users:
            u.replace_input_with(ph, dec)
        changed = True
    names = getattr(seg_gm, "_edgecut_outputs", ())
    values = list(out.args[0])
    for i, name in enumerate(names):
        node, base = split_name(name)
        if base == "fp32":
            continue
        with g.inserting_before(out):
            values[i] = _encode(seg_gm, g, values[i], node, base, scales)
        changed = True
    if not changed:
        return seg_gm
    out.args = (tuple(values),)
    g.lint()
    seg_gm.recompile()
    return seg_gm


def add_coded_values(values: dict, segments, gm: fx.GraphModule) -> None:
    """Add to `values` (node name -> array on the example input) every coded tensor a segment
    reads or returns, coded by the numpy reference (`codecs.encode`)."""
    scales = gm.meta.get(meta.CODEC_SCALES) or {}
    for s in segments:
        for name in (*s.inputs, *s.outputs):
            node, base = split_name(name)
            if base != "fp32" and name not in values and node in values:
                affine = _affine(scales, node) if base == "int8" else None
                values[name] = codecs.encode(base, values[node], affine)


def reference_outputs(seg_gm: fx.GraphModule, seg, ins, values: dict) -> list:
    """What `seg` must return on `ins`: the whole model's values, or for a segment that codes or
    decodes, its own PyTorch module run on `ins` (a decoded tensor is not the model's)."""
    if not any(split_name(n)[1] != "fp32" for n in (*seg.inputs, *seg.outputs)):
        return [values[o] for o in seg.outputs]
    with torch.no_grad():
        out = seg_gm(*[torch.from_numpy(np.array(x)) for x in ins])
    return [o.detach().cpu().numpy() for o in out]


def output_error(names, got, want, tolerance: float) -> tuple:
    """(max error relative to scale, acceptable): a coded output may differ from the reference
    by its codec's rounding (`codecs.within_rounding`), any other by `tolerance`."""
    errs, ok = [], True
    for name, g, w in zip(names, got, want):
        base = split_name(name)[1]
        errs.append(max_error(g, w))
        ok &= codecs.within_rounding(base, g, w) if base != "fp32" else errs[-1] <= tolerance
    return max(errs, default=0.0), bool(ok)
