"""Features of a layer for the latency regressors: pure functions of a node's metadata.

Two feature sets per node:
- Edgent's (the paper's Table 1), as `annotate_layers` wrote them in `meta.FEATURES`:
  conv x1 = input feature-map elements, x2 = (kernel/stride)^2 * filters; linear and pool
  (input size, output size); relu, lrn, dropout (input size,).
- The work features used by edgecut's default regressors (`WORK`): MACs (those the built code
  does: Winograd convolutions do fewer, `winograd_share`), input elements, output elements and
  parameter elements. Latency of compiled code is close to a power law of
  these, which a linear model on their logarithms captures.

Fusion: TVM's FuseOps folds elementwise ops (relu, batchnorm at inference, residual add, ...)
into the conv/matmul/pool that produces them, so such a node costs only a small epilogue.
`fused_into` says when that happens.
"""
from __future__ import annotations

import math

import numpy as np

from edgecut.frontend import meta as M

WORK = ("macs", "in_elems", "out_elems", "params")
# WORK plus the layer's geometry: kernels and channel counts decide how well a schedule vectorizes.
# `cin_align`/`cout_align`: the largest power of two (up to 64) dividing the channel counts: the
# schedules split channels into SIMD lanes and register blocks by divisors, so 96 and 100 channels
# run at very different efficiency. `groups_ratio`: input channels per group (1 for depthwise).
SHAPE = WORK + ("cin", "cout", "kernel", "stride", "hw", "cin_align", "cout_align", "cin_per_group")

# Elementwise kinds that TVM fuses into their producer's kernel.
ELEMENTWISE = frozenset({M.RELU, M.ACTIVATION, M.BN, M.ADD, M.MUL, M.DROPOUT, M.RESHAPE})
# Producers whose output an elementwise op can be fused into (TVM's "out-elementwise fusable"
# ops, plus injective ones).
FUSABLE_PRODUCERS = frozenset({M.CONV, M.DWCONV, M.LINEAR, M.MAXPOOL, M.AVGPOOL}) | ELEMENTWISE
# Activations that are not elementwise (reductions) never fuse as an epilogue.
_NOT_ELEMENTWISE_FN = frozenset({"Softmax", "LogSoftmax", "softmax", "log_softmax", "_softmax"})



def _align(c, cap: int = 64) -> int:
    c = int(c)
    return cap if c <= 0 else min(cap, c & -c)


def work_features(node) -> dict:
    """The `SHAPE` features of an annotated fx node: MACs, input/output/parameter elements, and
    input/output channels, kernel area, stride and output spatial size (1 where meaningless)."""
    m = node.meta
    a = m.get(M.ATTRS) or {}
    shape = m.get(M.SHAPE)
    shape = shape if shape and isinstance(shape[0], int) else ()
    cin = a.get("in_channels", a.get("in_features", shape[1] if len(shape) > 1 else 1))
    cout = a.get("out_channels", a.get("out_features", shape[1] if len(shape) > 1 else 1))
    groups = a.get("groups", 1) or 1
    macs = float(m.get(M.MACS, 0)) * winograd_share(m.get(M.KIND), a, shape)
    return {"cin_align": float(_align(cin)), "cout_align": float(_align(cout)),
            "cin_per_group": float(max(1, int(cin) // int(groups))), "macs": macs,
            "in_elems": float(m.get(M.IN_ELEMS, 0)),
            "out_elems": float(M.elements(m.get(M.SHAPE))), "params": float(m.get(M.PARAMS, 0)),
            "cin": float(cin), "cout": float(cout), "kernel": float(math.prod(a.get("kernel", (1,)))),
            "stride": float(math.prod(a.get("stride", (1,)))), "hw": float(math.prod(shape[2:]) if shape else 1)}


def winograd_share(kind, attrs: dict, shape) -> float:
    """The share of a convolution's direct multiply-adds that the built code does: edgecut's
    build runs 3x3 stride-1 convolutions as Winograd F(m x m, 3 x 3) where
    `edgecut.codegen.winograd.choose_tile` says so, (m + 2)^2 / (9 m^2) of the multiplies
    (0.25 at m = 4, 0.44 at m = 2); 1 for every other layer."""
    if kind != M.CONV or len(shape) != 4 or tuple(attrs.get("kernel", ())) != (3, 3):
        return 1.0
    if tuple(attrs.get("stride", ())) != (1, 1) or tuple(attrs.get("dilation", (1, 1))) != (1, 1):
        return 1.0
    if attrs.get("groups", 1) != 1:
        return 1.0
    from edgecut.codegen.winograd import choose_tile

    t = choose_tile(shape[2], shape[3], int(attrs.get("in_channels", 0)), int(attrs.get("out_channels", 0)))
    return (t + 2) ** 2 / (9.0 * t * t) if t else 1.0


def edgent_features(node) -> tuple:
    """Edgent's (x1[, x2]) of an annotated fx node."""
    return tuple(float(v) for v in node.meta.get(M.FEATURES, ()))


def is_elementwise(node) -> bool:
    kind = node.meta.get(M.KIND)
    return kind in ELEMENTWISE and node.meta.get(M.MODULE_TYPE) not in _NOT_ELEMENTWISE_FN


def fused_into(node) -> bool:
    """True when TVM fuses `node` into the kernel of one of its producers: an elementwise op
    whose tensor input comes from a conv/linear/pool or from another fused elementwise op."""
    if not is_elementwise(node):
        return False
    producers = [a for a in node.all_input_nodes if a.op not in ("get_attr",)]
    return any(a.op != "placeholder" and a.meta.get(M.KIND) in FUSABLE_PRODUCERS
               and (a.meta.get(M.KIND) not in ELEMENTWISE or is_elementwise(a)) for a in producers)


def folded_into_conv(node) -> bool:
    """True for a batch norm applied to a convolution's output: edgecut's build folds it into the
    convolution's weights and bias at compile time (`codegen.rewrites.fold_batch_norm_into_conv`),
    so at run time it costs nothing, not even a fused epilogue."""
    if node.meta.get(M.KIND) != M.BN:
        return False
    producers = [a for a in node.all_input_nodes if a.op not in ("get_attr",)]
    return bool(producers) and producers[0].meta.get(M.KIND) in (M.CONV, M.DWCONV)


def work_matrix(rows: list[dict], columns=WORK) -> np.ndarray:
    """Stack feature dicts into an (n, len(columns)) float array."""
    return np.array([[float(r[k]) for k in columns] for r in rows], dtype=float).reshape(len(rows), len(columns))


def edgent_matrix(rows: list[tuple]) -> np.ndarray:
    width = max((len(r) for r in rows), default=1)
    return np.array([list(r) + [0.0] * (width - len(r)) for r in rows], dtype=float).reshape(len(rows), width)
