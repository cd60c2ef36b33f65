"""edgecut's schedule rules for CPU code, applied without any search.

`schedule_module(mod, target)` schedules every PrimFunc of a fused Relax module (after
LegalizeOps, FuseOps, FuseTIR): one reduction (convolution, dense, pooling) gets the
register-blocked micro-kernel of `reduction.py` with its element-wise epilogue computed per tile;
producers that only move data are inlined, padding stays a separate vectorized pass; everything
else gets the flat parallel + vectorized rule of `injective.py`. The rules read only the shapes
of the blocks, never a model name, and the vector width comes from the target (AVX-512: 16 fp32
lanes, NEON: 4).
"""
from __future__ import annotations

import logging

from edgecut.codegen.schedules import winograd
from edgecut.codegen.schedules.common import (LIGHT_REDUCTION, has_if_then_else, is_reduction,
                                              reduction_size, vector_lanes)
from edgecut.codegen.schedules.injective import schedule_injective, schedule_outer_parallel
from edgecut.codegen.schedules.reduction import plan_tiles, schedule_reduction

log = logging.getLogger(__name__)


__all__ = ["schedule_module", "schedule_func", "make_schedule", "vector_lanes", "plan_tiles"]


def schedule_func(func, target):
    """Return `func` (a tirx.PrimFunc) scheduled for `target`, or unchanged if already scheduled."""
    if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
        return func
    return make_schedule(func, target).mod["main"].with_attr("tirx.is_scheduled", True)


def make_schedule(func, target):
    """The `tvm.s_tir.Schedule` of `func` under edgecut's rules (its `.trace` replays them: that
    is how `edgecut tune` records them as a candidate next to MetaSchedule's)."""
    from tvm import s_tir
    from tvm.ir import IRModule

    lanes = vector_lanes(target)
    sch = s_tir.Schedule(IRModule({"main": func}))
    root = sch.get_sblock(sch.mod["main"].body.block.name_hint)
    blocks = list(sch.get_child_blocks(root))
    reds = [b for b in blocks if is_reduction(sch, b)]
    if winograd.is_winograd(sch, blocks):  # Winograd data pack / inverse (codegen/winograd.py)
        winograd.schedule_winograd(sch, blocks, lanes)
    elif len(reds) == 1:
        _schedule_one_reduction(sch, blocks, reds[0], lanes)
    else:
        _inline_data_movement(sch, blocks)
        for b in sch.get_child_blocks(root):
            if is_reduction(sch, b):
                schedule_outer_parallel(sch, b)
            else:
                schedule_injective(sch, b, lanes)
    return sch


def _schedule_one_reduction(sch, blocks, main, lanes):
    names = [sch.get(b).name_hint for b in blocks]
    idx = names.index(sch.get(main).name_hint)
    # producers: inline pure data movement (transposes, reshapes); keep padding materialized
    # in front of dense reductions (convolutions), inline it into light ones (pooling,
    # depthwise) where a separate pass over memory would cost more than the bounds checks
    light = reduction_size(sch, main) <= LIGHT_REDUCTION
    for b in reversed(blocks[:idx]):
        if light or not has_if_then_else(sch, b):
            _try(sch.compute_inline, b)
    # consumers: fold the element-wise chain into one block that runs per output tile. A value
    # read twice (SiLU's x * sigmoid(x), hardswish) first goes into its one reader, so the chain
    # is linear: reverse-inlining a block whose output another block still reads leaves that
    # read dangling ("T_add_intermediate is used before its definition" at lowering)
    for b in blocks[idx + 1:-1]:
        if len(sch.get_consumers(b)) == 1:
            _try(sch.compute_inline, b)
    for b in reversed(blocks[idx + 1:]):
        if _alive(sch, b) and len(sch.get_producers(b)) == 1:
            _try(sch.reverse_compute_inline, b)
    if not schedule_reduction(sch, main, lanes):
        schedule_outer_parallel(sch, main)
    root = sch.get_sblock(sch.mod["main"].body.block.name_hint)
    main_loops = sch.get_loops(main)
    for b in sch.get_child_blocks(root):
        if not _shares_outer_loop(sch, b, main_loops) and not _is_preproc(sch, b):
            schedule_injective(sch, b, lanes)


def _alive(sch, block) -> bool:
    try:
        sch.get(block)
        return True
    except Exception:  # noqa: BLE001 - the block was inlined away
        return False


def _inline_data_movement(sch, blocks):
    for b in blocks[:-1]:
        if not is_reduction(sch, b):
            _try(sch.compute_inline, b)


def _shares_outer_loop(sch, block, main_loops) -> bool:
    """True if `block` sits in the reduction's loop nest (the reduction, its init, an epilogue)."""
    loops = sch.get_loops(block)
    if not main_loops:
        return not loops
    return bool(loops) and sch.get_sref(loops[0]).same_as(sch.get_sref(main_loops[0]))


def _is_preproc(sch, block) -> bool:
    """A weight-repacking block: it leaves the kernel (SplitLayoutRewritePreproc), unscheduled."""
    return "meta_schedule.layout_rewrite_preproc" in sch.get(block).annotations


def _try(fn, *args) -> bool:
    try:
        fn(*args)
        return True
    except Exception:  # noqa: BLE001 - a schedule primitive refused: keep the block as is
        return False


def generic_schedule(func, target):
    """`func` with the safe rule only: no inlining; every reduction's leading data-parallel loops
    run in parallel, every other block flat parallel + vectorized (for kernels the rules above
    cannot schedule correctly)."""
    from tvm import s_tir
    from tvm.ir import IRModule

    lanes = vector_lanes(target)
    sch = s_tir.Schedule(IRModule({"main": func}))
    root = sch.get_sblock(sch.mod["main"].body.block.name_hint)
    for b in sch.get_child_blocks(root):
        _try(schedule_outer_parallel if is_reduction(sch, b) else
             (lambda s, blk: schedule_injective(s, blk, lanes)), sch, b)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def lowers(func, target) -> str:
    """"" if TVM's TIR pipeline lowers `func` for `target` (what `tvm.compile` runs before LLVM),
    else the first line of its error: a schedule that passed every primitive can still leave IR
    the lowering refuses (a buffer inlined away that a later block reads)."""
    import tvm

    from tvm import s_tir, tirx

    t = s_tir.transform
    passes = [t.CanonicalizeLoop(), t.LowerInitBlock(), t.PlanAndUpdateBufferAllocationLocation(),
              t.ConvertBlocksToOpaque(), t.CompactBufferAllocation(), t.LowerMatchBuffer(),
              t.StmtSimplify(), t.LowerOpaqueBlock(), tirx.transform.FlattenBuffer(),
              tirx.transform.NarrowDataType(32), t.LoopPartition(), tirx.transform.VectorizeLoop(True),
              tirx.transform.StorageRewrite()]
    try:
        mod = tirx.transform.BindTarget(tvm.target.Target(target))(tvm.IRModule({"main": func}))
        tvm.transform.Sequential(passes)(mod)
        return ""
    except Exception as e:  # noqa: BLE001 - the reason is logged by the caller
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[-1][:200] if text else ''}"


def schedule_module(mod, target, *, generic: bool = False):
    """Schedule every unscheduled PrimFunc in `mod` (an IRModule) for `target`. A kernel the rules
    cannot schedule, or whose schedule does not lower, gets `generic_schedule` (one log line names
    it); if even that fails it stays unscheduled (TVM's default: correct, slow). `generic=True`
    gives every kernel the generic schedule."""
    import tvm

    out = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or (
                func.attrs is not None and "tirx.is_scheduled" in func.attrs):
            continue
        why = "generic schedules requested"
        if not generic:
            try:
                out[gv] = schedule_func(func, target)
                why = lowers(out[gv], target)
            except Exception as e:  # noqa: BLE001 - never fail a build for want of a schedule
                text = str(e).strip().splitlines()
                why = f"{type(e).__name__}: {text[-1][:200] if text else ''}"
            if not why:
                continue
            log.warning("edgecut schedules: %s gets the generic schedule (rule failed: %s)", gv.name_hint, why)
        try:
            out[gv] = generic_schedule(func, target)
            if lowers(out[gv], target):
                raise RuntimeError(lowers(out[gv], target))
        except Exception as e:  # noqa: BLE001
            log.warning("edgecut schedules: %s left unscheduled (%s: %s)", gv.name_hint, type(e).__name__,
                        (str(e).strip().splitlines() or [""])[-1][:200])
            out.pop(gv, None)
    for gv, func in out.items():
        mod[gv] = func
    return mod
