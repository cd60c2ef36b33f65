"""Winograd convolution: a Relax rewrite of 3x3, stride-1 convolutions (NHWC/HWIO) into
F(m x m, 3 x 3) (Lavin & Gray, arXiv:1509.09308), which does 2.25x (m = 2) or 4x (m = 4) fewer
multiply-adds than the direct convolution.

`winograd_conv2d(mod, num_inputs)` replaces each eligible `relax.nn.conv2d` of `main` by four
`call_tir`s (alpha = m + 2, P = output tiles of m x m):

    U = winograd_weight_transform(W)      G g G^T            [alpha, alpha, C, K]  weight-only
    V = winograd_data_pack(x)             pad, B^T (d B)     [alpha, alpha, P, C]
    M = winograd_batch_gemm(V, U)         per (eps, nu): V @ U [alpha, alpha, P, K]
    y = winograd_inverse(M)               A^T m A, cropped   [N, H', W', K]

U depends on the weights only, so `LiftTransformParams` (which must run after this rewrite) takes
it out of `main`: it is computed once at compile time and `main` receives U as a weight. The
inverse is marked fusable with its element-wise consumers (bias, residual add, ReLU), the other
three are opaque to fusion; `edgecut/codegen/schedules/winograd.py` schedules all three (they
are recognised by their blocks' `winograd` annotation).

The transforms are written as explicit sums of the nonzero matrix entries (no multiplies by 0
or 1), selected per row of B (the pack runs in two stages, rows then columns: one 36-way
selection of 36-term sums took LLVM 5 s per kernel) or per output pixel of the tile (inverse);
the schedule unrolls those loops, so the selections fold to constants and LLVM shares the loads
and partial sums.

Must run after `ConvertLayout` to NHWC/HWIO and before `LiftTransformParams` and `LegalizeOps`.
"""
from __future__ import annotations

import functools

import numpy as np

from edgecut.codegen.rewrites import weight_only

# op_pattern values of tvm.relax (tvm/relax/op_attr_types.h)
OUT_EWISE_FUSABLE = 4
OPAQUE = 8

# The tile rule, measured on ResNet-18's and AlexNet's shapes (bench/NOTES-codegen.md, v7):
# m = 4 when there are enough tiles for the GEMM to reuse each weight vector (its register block
# runs over tiles); m = 2 for smaller images; direct below (7 x 7: weight-bound, and m = 2's
# weights are 16/9 of the direct ones).
MIN_TILES_M4 = 49     # P at m = 4 (7 x 7 tiles: a 28 x 28 output)
MIN_TILES_M2 = 36     # P at m = 2 (a 12 x 12 output)
MIN_CHANNELS_M4 = 16  # C and K: below, the transforms cost more than the multiplies saved
MIN_CHANNELS_M2 = 32  # (m = 2 expands the input 4x, m = 4 2.25x: its transforms weigh more)


def choose_tile(out_h: int, out_w: int, in_c: int, out_c: int, largest: int = 4) -> int:
    """The Winograd output tile m (4 or 2, at most `largest`) for a 3x3 stride-1 convolution
    with this output size and these channels, or 0 for the direct convolution."""
    channels = min(in_c, out_c)
    if largest >= 4 and channels >= MIN_CHANNELS_M4 and _tiles(out_h, 4) * _tiles(out_w, 4) >= MIN_TILES_M4:
        return 4
    if largest >= 2 and channels >= MIN_CHANNELS_M2 and _tiles(out_h, 2) * _tiles(out_w, 2) >= MIN_TILES_M2:
        return 2
    return 0


def _tiles(n: int, m: int) -> int:
    return -(-n // m)


@functools.lru_cache(maxsize=None)
def transform_matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A [alpha, m], B [alpha, alpha], G [alpha, 3]) of F(m, 3) with TVM's interpolation points
    (Barabasz et al.'s most accurate ones): y = A^T [(G g G^T) * (B^T d B)] A."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    a, b, g = _cook_toom_convolution(_interpolation_points(m + 2), m, 3)
    return np.asarray(a, "float64"), np.asarray(b, "float64"), np.asarray(g, "float64")


def _lin(coeffs, terms):
    """sum(c * t) over the nonzero coefficients, with +-1 as adds and subtracts."""
    from tvm import tirx

    out = None
    for c, t in zip(coeffs, terms):
        c = float(c)
        if c == 0.0:
            continue
        if abs(c) != 1.0:
            t = t * tirx.const(abs(c), "float32")
        if out is None:
            out = t if c > 0 else -t
        else:
            out = out + t if c > 0 else out - t
    return out if out is not None else tirx.const(0.0, "float32")


def _select(index_a, index_b, n_a, n_b, leaf):
    """leaf(i, j) for the (i, j) equal to the index expressions, as a chain of selects."""
    from tvm import tirx

    def over_b(i):
        e = leaf(i, n_b - 1)
        for j in range(n_b - 2, -1, -1):
            e = tirx.Select(index_b == j, leaf(i, j), e)
        return e
    out = over_b(n_a - 1)
    for i in range(n_a - 2, -1, -1):
        out = tirx.Select(index_a == i, over_b(i), out)
    return out


def weight_transform(w, m: int):
    """U[eps, nu, c, k] = (G g G^T) for an HWIO 3x3 kernel `w` (a te.Tensor)."""
    from tvm import te, topi

    _, _, g = transform_matrices(m)
    alpha, (_, _, c, k) = m + 2, w.shape
    gm = topi.utils.const_matrix(g.astype("float32"), "winograd_G")
    r1 = te.reduce_axis((0, 3), "r1")
    r2 = te.reduce_axis((0, 3), "r2")
    return te.compute((alpha, alpha, c, k), lambda e, n, ci, co: te.sum(
        w[r1, r2, ci, co] * gm[e, r1] * gm[n, r2], axis=[r1, r2]), name="winograd_weight_transform")


def data_pack(x, m: int, pad_top: int, pad_left: int, out_h: int, out_w: int):
    """V[eps, nu, p, c] = (B^T d B) for each m x m output tile p of NHWC `x`: the input is
    zero-padded (top/left as the convolution says, bottom/right to whole tiles) first."""
    from tvm import te, tirx

    _, b, _ = transform_matrices(m)
    alpha = m + 2
    n_b, h, w, c = (int(s) for s in x.shape)
    th, tw = _tiles(out_h, m), _tiles(out_w, m)
    ph, pw = th * m + 2, tw * m + 2

    def padded(nb, i, j, ci):
        inside = tirx.all(i >= pad_top, i < pad_top + h, j >= pad_left, j < pad_left + w)
        return tirx.if_then_else(inside, x[nb, i - pad_top, j - pad_left, ci],
                                 tirx.const(0.0, x.dtype))
    xp = te.compute((n_b, ph, pw, c), padded, name="winograd_pad", attrs={"winograd": "pad"})

    def rows(eps, r2, p, ci):  # T[eps, r2] = sum_r1 B[r1, eps] * d[r1, r2]
        nb, t = p // (th * tw), p % (th * tw)
        y0, x0 = (t // tw) * m, (t % tw) * m
        return _select(eps, r2, alpha, 1, lambda e, _: _lin(
            b[:, e], [xp[nb, y0 + r1, x0 + r2, ci] for r1 in range(alpha)]))
    tr = te.compute((alpha, alpha, n_b * th * tw, c), rows, name="winograd_pack_rows",
                    attrs={"winograd": "pack_rows"})

    def pack(eps, nu, p, ci):  # V[eps, nu] = sum_r2 B[r2, nu] * T[eps, r2]
        return _select(nu, eps, alpha, 1, lambda n, _: _lin(
            b[:, n], [tr[eps, r2, p, ci] for r2 in range(alpha)]))
    return te.compute((alpha, alpha, n_b * th * tw, c), pack, name="winograd_data_pack",
                      attrs={"winograd": "data_pack"})


def batch_gemm(v, u):
    """M[eps, nu, p, k] = sum_c V[eps, nu, p, c] * U[eps, nu, c, k]."""
    from tvm import te

    alpha, _, p, c = v.shape
    k = u.shape[3]
    rc = te.reduce_axis((0, c), "rc")
    return te.compute((alpha, alpha, p, k), lambda e, n, pi, ko: te.sum(
        v[e, n, pi, rc] * u[e, n, rc, ko], axis=rc), name="winograd_batch_gemm",
        attrs={"winograd": "gemm"})


def inverse(mm, m: int, batch: int, out_h: int, out_w: int):
    """y[b, h, w, k] = (A^T M A)[h % m, w % m] of the tile holding (h, w): tiles cropped to
    the output."""
    from tvm import te

    a, _, _ = transform_matrices(m)
    alpha = m + 2
    th, tw = _tiles(out_h, m), _tiles(out_w, m)

    def inv(nb, y, x, k):
        p = nb * (th * tw) + (y // m) * tw + x // m

        def leaf(i, j):  # sum_eps A[eps, i] * (sum_nu A[nu, j] * M[eps, nu])
            rows = [_lin(a[:, j], [mm[e, n, p, k] for n in range(alpha)]) for e in range(alpha)]
            return _lin(a[:, i], rows)
        return _select(y % m, x % m, m, m, leaf)
    return te.compute((batch, out_h, out_w, mm.shape[3]), inv, name="winograd_inverse",
                      attrs={"winograd": "inverse", "winograd_tile": m})


def winograd_conv2d(mod, num_inputs: int, tile_rule=None, largest: int = 4):
    """Return `mod` with `main`'s eligible convolutions in Winograd form (see the module
    docstring). Eligible: relax.nn.conv2d, NHWC data and output, HWIO kernel 3x3, stride 1,
    dilation 1, groups 1, float32, static shapes, a kernel computed from weights only (so its
    transform is lifted), and `tile_rule(out_h, out_w, C, K)` (default: `choose_tile` with tiles
    up to `largest`) nonzero. Others are untouched.

    F(4x4, 3x3) rounds more than the direct convolution (its transforms multiply by up to 5): a
    deep stack of them can drift past the build's 1e-4 check (timm's Inception-v3: 1.0e-4 of the
    output's scale at m = 4, 3e-5 at m = 2, eager fp32 itself 2.9e-5 off fp64), so a segment
    that fails its check is built again with `largest=2` (codegen/artifact.py)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    conv2d = tvm.ir.Op.get("relax.nn.conv2d")
    weights = set(mod["main"].params[num_inputs:])
    tile_rule = tile_rule or (choose_tile if largest >= 4 else (lambda *shape: choose_tile(*shape, largest=largest)))

    @mutator
    class Winograd(PyExprMutator):
        def __init__(self, m):
            super().__init__(m)
            self.memo = {}
            self.fired = 0

        def visit_call_(self, call):
            call = super().visit_call_(call)
            plan = self.plan(call)
            return call if plan is None else self.rewrite(call, *plan)

        def plan(self, call):
            if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(conv2d)):
                return None
            a = call.attrs
            if (a.data_layout != "NHWC" or a.kernel_layout != "HWIO" or a.out_layout != "NHWC"
                    or int(a.groups) != 1 or [int(s) for s in a.strides] != [1, 1]
                    or [int(d) for d in a.dilation] != [1, 1]):
                return None
            x, w = call.args
            shapes = [_static_shape(e) for e in (x, w, call)]
            if any(s is None for s in shapes) or any(
                    e.ty.dtype != "float32" for e in (x, w, call)):
                return None
            (_, _, _, c), (kh, kw, _, k), (_, oh, ow, _) = shapes
            if (kh, kw) != (3, 3) or not weight_only(self, w, weights, self.memo):
                return None
            m = tile_rule(oh, ow, c, k)
            return (m, [int(p) for p in a.padding], shapes) if m else None

        def rewrite(self, call, m, padding, shapes):
            from tvm import te

            x, w = call.args
            (nb, _, _, c), (_, _, _, k), (_, oh, ow, _) = shapes
            alpha, p = m + 2, nb * _tiles(oh, m) * _tiles(ow, m)
            tx = te.placeholder(shapes[0], "float32", "x")
            tw = te.placeholder(shapes[1], "float32", "w")
            tv = te.placeholder((alpha, alpha, p, c), "float32", "V")
            tu = te.placeholder((alpha, alpha, c, k), "float32", "U")
            tm = te.placeholder((alpha, alpha, p, k), "float32", "M")
            u = self.emit("winograd_weight_transform", [tw], weight_transform(tw, m), [w], OPAQUE)
            v = self.emit("winograd_data_pack", [tx],
                          data_pack(tx, m, padding[0], padding[1], oh, ow), [x], OPAQUE)
            mm = self.emit("winograd_batch_gemm", [tv, tu], batch_gemm(tv, tu), [v, u], OPAQUE)
            self.fired += 1
            return relax.call_tir(self.add("winograd_inverse", [tm], inverse(tm, m, nb, oh, ow),
                                           OUT_EWISE_FUSABLE),
                                  [mm], relax.TensorType(shapes[2], "float32"))

        def add(self, name, ins, out, pattern):
            func = tvm.te.create_prim_func([*ins, out], "int64").without_attr("global_symbol")
            func = func.with_attr("op_pattern", pattern)
            return self.builder_.add_func(func, name)

        def emit(self, name, ins, out, args, pattern):
            gv = self.add(name, ins, out, pattern)
            shape = [int(s) for s in out.shape]
            return self.builder_.emit(relax.call_tir(gv, args, relax.TensorType(shape, "float32")))

    rw = Winograd(mod)
    main = rw.visit_expr(mod["main"])
    if not rw.fired:
        return mod
    out = rw.builder_.get()
    out["main"] = main
    return out


def _static_shape(e):
    shape = getattr(e.ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    try:
        return tuple(int(s) for s in shape.values)
    except TypeError:
        return None
