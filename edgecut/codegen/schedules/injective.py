"""Rule for element-wise and other injective blocks (padding, layout transposes, bias + ReLU
chains left alone by fusion): one flat loop, vectorized by the register width, split across
the cores. A transpose (a block that reads along a different axis than it writes, such as the
NCHW -> NHWC input) is tiled instead: vectors along the axis it reads contiguously, the axes
inside it unrolled, so loads are contiguous vectors rather than gathers of strided floats."""
from __future__ import annotations

from edgecut.codegen.schedules.common import COMM_REDUCE, extent, pow2_divisor

# Below this many elements a kernel runs on one thread: waking the pool costs more than it saves
# (and on a loaded machine a descheduled worker stalls the whole kernel).
MIN_PARALLEL_ELEMENTS = 16384


MAX_UNROLL = 16  # elements of the axes inside a transpose's vector axis that are unrolled


def schedule_injective(sch, block, lanes: int) -> None:
    """Fuse the block's loops, vectorize the innermost `lanes` (when they divide the extent) and
    parallelise the rest. Works for any shape; leaves the block untouched if it has no loops."""
    loops = sch.get_loops(block)
    if not loops:
        return
    if _schedule_transpose(sch, block, loops, lanes):
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


def read_contiguous_axis(sch, block) -> int:
    """The loop index (block axis) a read of `block` walks contiguously in memory (its last
    index), when that is not the block's innermost axis: a transpose. -1 if there is none."""
    block_ = sch.get(block)
    iters = [iv.var for iv in block_.iter_vars]
    if len(iters) < 2:
        return -1
    for region in block_.reads:
        if len(region.region) < 2:
            continue
        last = region.region[-1].min
        for i, var in enumerate(iters[:-1]):
            if last.same_as(var):
                return i
    return -1


def _schedule_transpose(sch, block, loops, lanes: int) -> bool:
    """Tile a transpose: split the axis read contiguously into vectors, keep the axes after it
    inside (unrolled when small), run the tiles in parallel. False if `block` is no transpose."""
    if len(loops) != len(sch.get(block).iter_vars) or any(
            int(iv.iter_type) == COMM_REDUCE for iv in sch.get(block).iter_vars):
        return False
    j = read_contiguous_axis(sch, block)
    if j < 0:
        return False
    v = pow2_divisor(extent(sch, loops[j]), lanes)
    if v < 2:
        return False
    total, inside = 1, 1
    for i, lp in enumerate(loops):
        total *= extent(sch, lp)
        inside *= extent(sch, lp) if i > j else 1
    jo, ji = sch.split(loops[j], [None, v])
    rest = list(loops[j + 1:])
    sch.reorder(*loops[:j], jo, *rest, ji)
    outer = [*loops[:j], jo]
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    if total >= MIN_PARALLEL_ELEMENTS and extent(sch, fused) > 1:
        sch.parallel(fused)
    if rest and inside <= MAX_UNROLL:
        for lp in rest:
            sch.unroll(lp)
    sch.vectorize(ji)
    return True
