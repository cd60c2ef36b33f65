"""Rule for element-wise and other injective blocks (padding, layout transposes, bias + ReLU
chains left alone by fusion): one flat loop, vectorized by the register width, split across
the cores."""
from __future__ import annotations

from edgecut.codegen.schedules.common import COMM_REDUCE, extent, pow2_divisor

# Below this many elements a kernel runs on one thread: waking the pool costs more than it saves
# (and on a loaded machine a descheduled worker stalls the whole kernel).
MIN_PARALLEL_ELEMENTS = 16384


def schedule_injective(sch, block, lanes: int) -> None:
    """Fuse the block's loops, vectorize the innermost `lanes` (when they divide the extent) and
    parallelise the rest. Works for any shape; leaves the block untouched if it has no loops."""
    loops = sch.get_loops(block)
    if not loops:
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    total = extent(sch, fused)
    v = pow2_divisor(total, lanes)
    parallel = total >= MIN_PARALLEL_ELEMENTS
    if v > 1 and total > v:
        outer, inner = sch.split(fused, [None, v])
        if parallel:
            sch.parallel(outer)
        sch.vectorize(inner)
    elif v > 1:
        sch.vectorize(fused)
    elif total > 1 and parallel:
        sch.parallel(fused)


def schedule_outer_parallel(sch, block) -> None:
    """Fallback for blocks no rule understands: parallelise the leading data-parallel loops."""
    loops = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    if len(loops) != len(iters):
        return
    lead = []
    for loop, iv in zip(loops, iters):
        if int(iv.iter_type) == COMM_REDUCE:
            break
        lead.append(loop)
    if not lead:
        return
    fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    if extent(sch, fused) > 1:
        sch.parallel(fused)
