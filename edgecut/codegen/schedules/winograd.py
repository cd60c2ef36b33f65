"""Rules for the Winograd kernels of `edgecut/codegen/winograd.py` (the batched GEMM between
them is an ordinary reduction: the register-blocked rule of `reduction.py` takes it).

Data pack (blocks `winograd_pad`, `winograd_data_pack`, V[eps, nu, p, c]):

    pad: flat, parallel, vectorized (materialized: the pack then reads without bounds checks)
    parallel  for p, c_o                   # one tile, one vector of channels per iteration
      unroll  for eps, nu                  # selections of B's entries fold to constants
        vector  for c_i                    # alpha^2 input vectors loaded, shared by all outputs

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

KEY, TILE = "winograd", "winograd_tile"  # block annotations set by codegen/winograd.py


def is_winograd(sch, blocks) -> bool:
    """True if the function holds a Winograd data pack or inverse (their blocks say so)."""
    return any(_role(sch, b) in ("data_pack", "inverse") for b in blocks)


def schedule_winograd(sch, blocks, lanes: int) -> None:
    roles = [_role(sch, b) for b in blocks]
    if "data_pack" in roles:
        if "pad" in roles:
            schedule_injective(sch, blocks[roles.index("pad")], lanes)
        _schedule_pack(sch, blocks[roles.index("data_pack")], lanes)
        return
    idx = roles.index("inverse")
    for b in reversed(blocks[idx + 1:]):  # bias, residual, ReLU: one expression per output
        sch.reverse_compute_inline(b)
    inv = blocks[idx]
    _schedule_inverse(sch, inv, int(sch.get(inv).annotations[TILE]), lanes)


def _role(sch, block) -> str | None:
    role = sch.get(block).annotations.get(KEY, None)
    return None if role is None else str(role)


def _schedule_pack(sch, block, lanes: int) -> None:
    eps, nu, p, c = sch.get_loops(block)
    v = pow2_divisor(extent(sch, c), lanes)
    c_o, c_i = sch.split(c, [None, v])
    sch.reorder(p, c_o, eps, nu, c_i)
    sch.parallel(sch.fuse(p, c_o))
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
