"""Rules for the Winograd kernels of `edgecut/codegen/winograd.py`, recognised by their blocks'
`winograd` annotation: data pack, batched GEMM (the register-blocked micro-kernel of
`reduction.py`, loops reordered, see `_schedule_gemm`) and inverse.

Data pack (blocks `winograd_pad`, `winograd_pack_rows`, `winograd_data_pack`, V[eps, nu, p, c]):

    pad: inlined (bounds checks per load: measured faster than a padded copy, 0.037 against
         0.063 ms for 64 channels at 56 x 56)
    parallel  for p, c_o                   # one tile, one vector of channels per iteration
      unroll  for eps
        unroll  for r2: vector T[r2] = sum_r1 B[r1, eps] d[r1, r2]   # alpha vectors, stack
        unroll  for nu: vector V[eps, nu] = sum_r2 B[r2, nu] T[r2]   # selections fold

Inverse (block `winograd_inverse` and its fused element-wise consumers, y[b, h, w, k]):

    parallel  for b, h_o, w_o              # one output tile per iteration
      for k_o
        unroll  for h_i, w_i               # m x m outputs of the tile from alpha^2 M vectors
          vector  for k_i                  # + bias, + residual, ReLU, stored once

Vector widths come from the target (`lanes`); every split is by a divisor or guarded by TVM's
predicate, so any shape schedules.
"""
from __future__ import annotations

from edgecut.codegen.schedules.common import extent, pow2_divisor
from edgecut.codegen.schedules.injective import schedule_injective
from edgecut.codegen.schedules.reduction import pack_weights, plan_tiles

KEY, TILE = "winograd", "winograd_tile"  # block annotations set by codegen/winograd.py


def is_winograd(sch, blocks) -> bool:
    """True if the function holds a Winograd data pack, GEMM or inverse (their blocks say so)."""
    return any(_role(sch, b) in ("data_pack", "gemm", "inverse") for b in blocks)


def schedule_winograd(sch, blocks, lanes: int) -> None:
    roles = [_role(sch, b) for b in blocks]
    if "data_pack" in roles:
        if "pad" in roles:
            sch.compute_inline(blocks[roles.index("pad")])
        _schedule_pack(sch, blocks[roles.index("pack_rows")], blocks[roles.index("data_pack")],
                       lanes)
        return
    if "gemm" in roles:
        _schedule_gemm(sch, blocks[roles.index("gemm")], lanes)
        return
    idx = roles.index("inverse")
    left = []
    for b in reversed(blocks[idx + 1:]):  # bias, residual, ReLU: one expression per output
        try:
            sch.reverse_compute_inline(b)
        except Exception:  # noqa: BLE001 - not element-wise: its own flat loop after the inverse
            left.append(b)
    inv = blocks[idx]
    _schedule_inverse(sch, inv, int(sch.get(inv).annotations[TILE]), lanes)
    for b in left:
        schedule_injective(sch, b, lanes)


def _role(sch, block) -> str | None:
    role = sch.get(block).annotations.get(KEY, None)
    return None if role is None else str(role)


def _schedule_pack(sch, rows, block, lanes: int) -> None:
    eps, nu, p, c = sch.get_loops(block)
    v = pow2_divisor(extent(sch, c), lanes)
    c_o, c_i = sch.split(c, [None, v])
    sch.reorder(p, c_o, eps, nu, c_i)
    sch.parallel(sch.fuse(p, c_o))
    # the alpha row sums T[eps, :] of one eps: alpha vectors, on the stack (in registers)
    sch.compute_at(rows, eps, preserve_unit_loops=True)
    r_loops = sch.get_loops(rows)[3:]      # (eps row, r2, p, c) inside the task's loops
    for lp in r_loops[:-1]:
        sch.unroll(lp)
    sch.vectorize(r_loops[-1])
    sch.unroll(eps)
    sch.unroll(nu)
    sch.vectorize(c_i)


def _schedule_inverse(sch, block, m: int, lanes: int) -> None:
    b, h, w, k = sch.get_loops(block)
    h_o, h_i = sch.split(h, [None, m])
    w_o, w_i = sch.split(w, [None, m])
    v = pow2_divisor(extent(sch, k), lanes)
    k_o, k_i = sch.split(k, [None, v])
    sch.reorder(b, h_o, w_o, k_o, h_i, w_i, k_i)
    sch.parallel(sch.fuse(b, h_o, w_o))
    sch.unroll(h_i)
    sch.unroll(w_i)
    sch.vectorize(k_i)


def _schedule_gemm(sch, block, lanes: int) -> None:
    """The register-blocked micro-kernel of `reduction.py` (same tile plan, weights packed along
    K at compile time), with the loops ordered (eps, nu, k tile, p tile): one thread's tasks
    stay on one (eps, nu) matrix pair, so its V rows (from L2) and U tile (in L1) are reused
    instead of streaming all alpha^2 pairs once per K tile."""
    e, n, p, k, _ = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    _, v, nvec, _, reg = plan_tiles([extent(sch, lp) for lp in (e, n, p, k)], lanes)
    pack_weights(sch, block, iters[3].var, nvec * v)
    e, n, p, k, rc = sch.get_loops(block)
    k_o, k_m, k_i = sch.split(k, [None, nvec, v])
    p_o, p_i = sch.split(p, [None, reg])
    sch.reorder(e, n, k_o, p_o, rc, p_i, k_m, k_i)
    outer = sch.fuse(e, n, k_o, p_o)
    sch.parallel(outer)
    acc = sch.cache_write(block, 0, "global")   # the tile's accumulators, on the stack
    sch.reverse_compute_at(acc, outer, preserve_unit_loops=True)
    inner = sch.get_loops(acc)[1:]
    store = sch.fuse(*inner) if len(inner) > 1 else inner[0]
    if v > 1:
        sch.vectorize(sch.split(store, [None, v])[1])
    sch.unroll(p_i)
    sch.unroll(k_m)
    if v > 1:
        sch.vectorize(k_i)
    init = sch.decompose_reduction(block, rc)
    if v > 1:
        sch.vectorize(sch.get_loops(init)[-1])
