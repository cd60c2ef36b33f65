"""Helpers shared by the schedule rules: block classification, vector width, tile factors."""
from __future__ import annotations

DATA_PAR = 0     # tirx.IterVar.DataPar
COMM_REDUCE = 2  # tirx.IterVar.CommReduce
# Reduction points per output up to which a reduction is "light" (pooling, depthwise; a 7x7
# window at most): its padding is inlined rather than copied, and its few weights are no reason
# to keep channel tiles outermost, so its tasks walk the input in pixel order.
LIGHT_REDUCTION = 49


def vector_lanes(target, bits: int = 32) -> int:
    """fp32 lanes of the target's widest vector register (16 on AVX-512, 8 on AVX2, 4 on NEON)."""
    import tvm

    try:
        width = int(tvm.target.codegen.llvm_get_vector_width(target))
    except Exception:  # noqa: BLE001 - a non-LLVM target: no vector hint
        width = 128
    return max(1, width // bits)


def pow2_divisor(extent: int, limit: int) -> int:
    """The largest power of two <= limit that divides extent."""
    v = 1
    while v * 2 <= limit and extent % (v * 2) == 0:
        v *= 2
    return v


def is_reduction(sch, block) -> bool:
    return any(int(iv.iter_type) == COMM_REDUCE for iv in sch.get(block).iter_vars)


def reduction_size(sch, block) -> int:
    """Points reduced per output element (1 for a block that does not reduce)."""
    n = 1
    for iv in sch.get(block).iter_vars:
        if int(iv.iter_type) == COMM_REDUCE:
            n *= int(iv.dom.extent)
    return n


def has_if_then_else(sch, block) -> bool:
    """True for padding-like blocks (their body selects between a load and a constant)."""
    text = str(sch.get(block).body)
    return "if_then_else" in text or "T.Select" in text


def extent(sch, loop) -> int:
    return int(sch.get(loop).extent)
