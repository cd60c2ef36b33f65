"""The `node.meta` keys edgecut reads and writes, declared once. Nothing else invents keys.

Written by the frontend's analysis passes (`edgecut.passes.annotate_shapes`,
`edgecut.passes.annotate_layers`) unless noted otherwise.
"""
from __future__ import annotations

# --- tensors (annotate_shapes) ---------------------------------------------------------------
SHAPE = "edgecut.shape"        # tuple[int, ...] of the node's output; for a tuple output: tuple of tuples
DTYPE = "edgecut.dtype"        # str, e.g. "float32" (tuple of str for a tuple output)
OUT_BYTES = "edgecut.bytes"    # int: bytes of the node's output (sum over a tuple output)

# --- layers (annotate_layers) ----------------------------------------------------------------
KIND = "edgecut.kind"          # one of KINDS below
MACS = "edgecut.macs"          # int: multiply-accumulates of the node (0 for data movement)
PARAMS = "edgecut.params"      # int: parameter elements owned by the node (module's own weights)
PARAM_BYTES = "edgecut.param_bytes"  # int
IN_ELEMS = "edgecut.in_elems"  # int: elements of the node's tensor inputs (sum)
FEATURES = "edgecut.features"  # tuple[float, ...]: Edgent's regression features (x1[, x2])
MODULE_TYPE = "edgecut.module_type"  # str: class name of the called module, or the function name
ATTRS = "edgecut.attrs"        # dict: kernel, stride, padding, groups, ... as plain ints/tuples

# --- cost (annotate_cost, issue 5) -----------------------------------------------------------
DEVICE_S = "edgecut.device_s"  # float: predicted seconds of this node on the device target
EDGE_S = "edgecut.edge_s"      # float: predicted seconds of this node on the edge target

# --- exits (insert_exits, issue 4) -----------------------------------------------------------
EXIT_ID = "edgecut.exit_id"    # int on nodes of an exit head (and its output logits); absent on backbone
EXIT_POINT = "edgecut.exit_point"  # int on the backbone node an exit branches from

# --- graph-level keys, on `gm.meta` (not node.meta) --------------------------------------------
EXITS = "edgecut.exits"        # list[dict]: one per exit, ordered by id: {"id", "point" (backbone node name),
                               #   "output" (logits node name), "macs", "accuracy", "threshold"}
EXIT = "edgecut.exit"          # int: the one exit a graph lowered by passes.lower_exit computes
RIGHT_SIZING = "edgecut.right_sizing"  # dict: what compile measured of the exits (test accuracy,
                               #   early-exit fractions), so a trained graph can be compiled again
CODEC_SCALES = "edgecut.codec_scales"  # dict: crossing node name -> codecs.Affine.to_dict() (int8 scales
                               #   calibrated on the training data by compile; read by codegen.codec_ops)
TRACER = "_edgecut_tracer"     # "fx" or "export": which tracer produced the graph
COST = "edgecut.cost"          # dict written by annotate_cost: {"device"|"edge": {"profile", "calibrated",
                               #   "error_p95", "source"}, "uncalibrated": [profile names allowed anyway]}

# --- layer kinds -----------------------------------------------------------------------------
INPUT, OUTPUT, PARAM = "input", "output", "param"
CONV, DWCONV, LINEAR = "conv", "dwconv", "linear"
MAXPOOL, AVGPOOL, ADAPTIVE_POOL = "maxpool", "avgpool", "adaptivepool"
RELU, ACTIVATION = "relu", "activation"
LRN, DROPOUT, BN = "lrn", "dropout", "bn"
NORM, ATTENTION = "norm", "attention"  # layer/group/instance norm; scaled dot-product attention
ADD, MUL, CONCAT, RESHAPE = "add", "mul", "concat", "reshape"
OTHER = "other"

KINDS = (INPUT, OUTPUT, PARAM, CONV, DWCONV, LINEAR, MAXPOOL, AVGPOOL, ADAPTIVE_POOL, RELU,
         ACTIVATION, LRN, DROPOUT, BN, ADD, MUL, CONCAT, RESHAPE, NORM, ATTENTION, OTHER)

# Kinds that are pure bookkeeping: they carry no cost of their own.
NO_COST_KINDS = frozenset({INPUT, OUTPUT, PARAM})



def elements(shape) -> int:
    """Elements of a `SHAPE` value: a tuple of ints, a tuple of such tuples (summed), or None (0)."""
    if shape is None:
        return 0
    if shape and isinstance(shape[0], tuple):
        return sum(elements(s) for s in shape)
    n = 1
    for d in shape:
        n *= d
    return n


# Keys every call node must have once the frontend's analysis has run (checked by verify).
REQUIRED_AFTER_ANALYSIS = (SHAPE, DTYPE, OUT_BYTES, KIND, MACS, PARAMS, PARAM_BYTES, FEATURES)
