"""Rule for a block that reduces (convolution in NHWC/HWIO, grouped and depthwise convolution,
dense/matmul with the weight stored K x N, pooling): a register-blocked micro-kernel.

Loop nest produced, for output axes (..., r, v) with `v` the contiguous (last) axis:

    parallel  for v_o, ..., r_o            # outer tiles, one task each
      for rh, rw, rc ...                   # the reduction, unchanged order
        unroll  for r_i                    # register block over the second-to-last axis
          unroll  for v_m                  # several vector registers along `v`
            vector  for v_i                # one SIMD register of lanes
              acc[r_i, v_m, v_i] += ...
      epilogue (bias, batch norm, ReLU, residual add) on the tile, still in cache

The accumulator tile stays in registers (r_i * v_m <= 24 vectors, and under 1 KB: TVM puts a
larger one in a heap workspace, where every multiply-add also loads and stores it), the weights
are read contiguously along `v` and the input is broadcast. Tile sizes are divisors of the extents, so
the code has no tail predicates; the rule is generic over shapes.
"""
from __future__ import annotations

from tvm.tirx import IndexMap

from edgecut.codegen.schedules.common import (COMM_REDUCE, LIGHT_REDUCTION, extent, pow2_divisor,
                                              reduction_size)

MAX_ACC_VECTORS = 24
MIN_PARALLEL_WORK = 65536  # multiply-adds below which one thread is faster than waking the pool
MAX_REG = 16  # pixels in a register block
VEC_CANDIDATES = (8, 7, 6, 5, 4, 3, 2)
# TVM keeps a buffer on the stack (where LLVM promotes it to registers) only below 1024 bytes;
# a larger accumulator tile becomes a TVMBackendAllocWorkspace call per task, in memory.
STACK_BYTES = 1024


def plan_tiles(spatial_extents: list[int], lanes: int) -> tuple[int, int, int, int, int]:
    """(vec_axis, v, nvec, reg_axis, reg) for the spatial extents of a reduction block.

    vec_axis: the last spatial axis longer than 1; v: SIMD lanes used on it; nvec: registers
    along it; reg_axis/reg: the register block on the previous axis longer than 1 (-1/1 if none).
    """
    vec_axis = max((i for i, e in enumerate(spatial_extents) if e > 1), default=-1)
    if vec_axis < 0:
        return -1, 1, 1, -1, 1
    ext = spatial_extents[vec_axis]
    v = pow2_divisor(ext, lanes)
    reg_axis = max((i for i, e in enumerate(spatial_extents[:vec_axis]) if e > 1), default=-1)
    reg_ext = spatial_extents[reg_axis] if reg_axis >= 0 else 1
    nvec, reg = _register_block(reg_ext, ext // v, v)
    return vec_axis, v, nvec, reg_axis, reg


def _register_block(reg_ext: int, vec_ext: int, v: int) -> tuple[int, int]:
    """(nvec, reg): the accumulator tile of reg pixels x nvec vectors (divisors of the extents)
    that does the most multiply-adds per load (reg * nvec / (reg + nvec)), with at most
    MAX_ACC_VECTORS registers and under STACK_BYTES; ties go to the larger tile."""
    best = ((0.0, 0, 0), 1, 1)
    for reg in (r for r in range(min(reg_ext, MAX_REG), 0, -1) if reg_ext % r == 0):
        for nvec in (n for n in VEC_CANDIDATES + (1,) if vec_ext % n == 0):
            if reg * nvec > MAX_ACC_VECTORS or reg * nvec * v * 4 >= STACK_BYTES:
                continue
            key = (reg * nvec / (reg + nvec), reg * nvec, reg)
            if key > best[0]:
                best = (key, nvec, reg)
    return best[1], best[2]


def schedule_reduction(sch, block, lanes: int) -> bool:
    """Tile one reduction block as the register-blocked micro-kernel above. Epilogue blocks
    that consume it are inlined into one and computed per tile. Returns False (schedule
    unchanged) when the block's loops do not map one to one onto its iteration variables."""
    loops = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    if len(loops) != len(iters):
        return False
    spatial = [lp for lp, iv in zip(loops, iters) if int(iv.iter_type) != COMM_REDUCE]
    reduce = [lp for lp, iv in zip(loops, iters) if int(iv.iter_type) == COMM_REDUCE]
    if not spatial or not reduce:
        return False
    ext = [extent(sch, lp) for lp in spatial]
    vec_axis, v, nvec, reg_axis, reg = plan_tiles(ext, lanes)
    if vec_axis >= 0 and nvec * v > 1:
        spatial_vars = [iv.var for iv in iters if int(iv.iter_type) != COMM_REDUCE]
        pack_weights(sch, block, spatial_vars[vec_axis], nvec * v)

    points = reduction_size(sch, block)
    outer, inner = [], []
    vec_outer = None
    for i, lp in enumerate(spatial):
        if i == vec_axis:
            vec_outer, vm, vi = sch.split(lp, [None, nvec, v])
            inner_vec = [vm, vi]
        elif i == reg_axis and reg > 1:
            ro, ri = sch.split(lp, [None, reg])
            outer.append(ro)
            inner.append(ri)
        else:
            outer.append(lp)
    if vec_outer is None:  # nothing longer than 1: a scalar reduction
        inner_vec = []
    elif points <= LIGHT_REDUCTION:
        outer.append(vec_outer)     # few weights per channel tile: tasks walk the input in order
    else:
        outer.insert(0, vec_outer)  # channel tiles outermost: their weights stay in cache
    sch.reorder(*outer, *reduce, *inner, *inner_vec)

    _attach_epilogue(sch, block, outer[-1], len(outer), lanes)
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    work = points
    for e in ext:
        work *= e
    if extent(sch, fused) > 1 and work >= MIN_PARALLEL_WORK:
        sch.parallel(fused)
    for lp in inner:
        sch.unroll(lp)
    if inner_vec:
        sch.unroll(inner_vec[0])
        if v > 1:
            sch.vectorize(inner_vec[1])
    # the init (acc = 0) becomes its own loop nest, before the reduction loops
    init = sch.decompose_reduction(block, reduce[0])
    init_loops = sch.get_loops(init)
    if v > 1 and int(sch.get(init_loops[-1]).kind) != 2:  # not yet ForKind.VECTORIZED
        sch.vectorize(init_loops[-1])
    return True


def pack_weights(sch, block, vec_var, tile: int) -> None:
    """Repack every weight the block reads along the vector axis (an HWIO kernel, a K x N dense
    weight) as [N // tile, ..., tile]: each task then streams its weights contiguously instead
    of one short row every N elements. Weights are the buffers the function's attribute
    `layout_free_buffers` names (set by relax.transform.AttachAttrLayoutFreeBuffers); the
    repacking block is marked as a layout-rewrite pre-process, which
    relax.transform.SplitLayoutRewritePreproc moves out of the kernel so that
    LiftTransformParams runs it once, at compile time."""
    func = sch.mod["main"]
    free = func.attrs.get("layout_free_buffers", None) if func.attrs is not None else None
    if not free:
        return
    params = [func.params[int(i)] for i in free]
    for i, region in enumerate(sch.get(block).reads):
        buf = region.source
        shape = [int(d) for d in buf.shape]
        if not any(buf.same_as(p) for p in params) or len(shape) < 2 or shape[-1] % tile:
            continue
        last = region.region[-1]
        if int(last.extent) != 1 or not last.min.same_as(vec_var):
            continue
        cached = sch.cache_read(block, i, "global")
        sch.annotate(cached, "meta_schedule.layout_rewrite_preproc", True)
        index_map = IndexMap.from_func(lambda *ax: (ax[-1] // tile, *ax[:-1], ax[-1] % tile),
                                       ndim=len(shape))
        sch.transform_layout(block, ("read", i), index_map)


def _attach_epilogue(sch, block, loop, n_outer: int, lanes: int) -> None:
    """Compute the consumers of `block` per output tile (at `loop`); if there are none, add a
    local accumulator so the reduction does not read and write the output buffer in memory."""
    consumers = sch.get_consumers(block)
    if not consumers:
        sch.cache_write(block, 0, "global")
        consumers = sch.get_consumers(block)
    for c in consumers:
        try:
            sch.reverse_compute_at(c, loop, preserve_unit_loops=True)
        except Exception:  # noqa: BLE001 - a consumer that needs more than the tile
            continue
        c_loops = sch.get_loops(c)
        own = c_loops[n_outer:]
        if own:
            fused = sch.fuse(*own) if len(own) > 1 else own[0]
            e = extent(sch, fused)
            v = pow2_divisor(e, lanes)
            if v > 1 and v < e:
                _, vi = sch.split(fused, [None, v])
                sch.vectorize(vi)
            elif v == e:
                sch.vectorize(fused)
