"""Relax-level rewrites that `edgecut.codegen.build.prepare` runs before layout conversion and
fusion. Each takes the module and returns a new `main` (or module): they move work that depends
on weights only (batch-norm statistics, reciprocals) where `LiftTransformParams` can run it once
at compile time, and put operators in forms that fuse into the convolution kernels."""
from __future__ import annotations


def weight_only(mutator, e, weights: set, memo: dict) -> bool:
    """True if the Relax expression `e` (seen from inside `mutator`, a PyExprMutator) is computed
    from weights and constants only, so `LiftTransformParams` can take it out of `main`. Used by
    the rewrites here and by `codegen/winograd.py`."""
    from tvm import relax

    kind = type(e).__name__
    if kind in ("GenericConst", "Constant", "PrimValue", "StringImm", "ShapeExpr"):
        return True
    if isinstance(e, relax.Var):
        if e in weights:
            return True
        if e not in memo:
            memo[e] = False  # cycles cannot occur in dataflow, but stay safe
            bound = mutator.lookup_binding(e)
            memo[e] = bound is not None and weight_only(mutator, bound, weights, memo)
        return memo[e]
    if isinstance(e, relax.Call):
        return all(weight_only(mutator, a, weights, memo) for a in e.args)
    if isinstance(e, relax.TupleGetItem):
        return weight_only(mutator, e.tuple_value, weights, memo)
    return False


def fold_batch_norm_into_conv(mod, num_inputs: int):
    """batch_norm(conv2d(x, W))[0] -> conv2d(x, W * s) + (beta - mean * s), with
    s = gamma / sqrt(var + eps) per output channel, when W and the batch-norm parameters are
    weights: the products are weight-only (lifted, computed once at compile time), so the kernel's
    epilogue is one add instead of subtract, two multiplies and an add per output element.
    Applies to grouped and depthwise convolutions too (W's O axis is the output channel)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    batch_norm = tvm.ir.Op.get("relax.nn.batch_norm")
    conv2d = tvm.ir.Op.get("relax.nn.conv2d")
    weights = set(mod["main"].params[num_inputs:])

    @mutator
    class FoldBN(PyExprMutator):
        def __init__(self, m):
            super().__init__(m)
            self.memo = {}

        def bound_call(self, e, op):
            if isinstance(e, relax.Var):
                e = self.lookup_binding(e)
            if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.same_as(op):
                return e
            return None

        def visit_tuple_getitem_(self, op):
            new = super().visit_tuple_getitem_(op)
            bn = self.bound_call(new.tuple_value, batch_norm) if new.index == 0 else None
            conv = self.bound_call(bn.args[0], conv2d) if bn is not None else None
            if conv is None:
                return new
            a = conv.attrs
            if (a.kernel_layout.find("O") < 0 or len(a.out_layout) != 4
                    or int(bn.attrs.axis) % 4 != a.out_layout.find("C")):
                return new
            if not all(weight_only(self, w, weights, self.memo)
                       for w in (conv.args[1], *bn.args[1:])):
                return new
            return self.fold(conv, bn)

        def fold(self, conv, bn):
            a, norm = conv.attrs, self.builder_.normalize
            gamma, beta, mean, var = bn.args[1:]
            dtype = var.ty.dtype
            scale = norm(relax.op.divide(relax.const(1.0, dtype), norm(relax.op.sqrt(
                norm(relax.op.add(var, relax.const(float(bn.attrs.epsilon), dtype)))))))
            if bn.attrs.scale:
                scale = norm(relax.op.multiply(scale, gamma))
            shift = norm(relax.op.negative(norm(relax.op.multiply(mean, scale))))
            if bn.attrs.center:
                shift = norm(relax.op.add(shift, beta))
            w_shape = [1] * 4
            w_shape[a.kernel_layout.find("O")] = -1
            o_shape = [1] * 4
            o_shape[a.out_layout.find("C")] = -1
            w = norm(relax.op.multiply(conv.args[1], norm(relax.op.reshape(scale, w_shape))))
            y = norm(relax.Call(conv.op, [conv.args[0], w], conv.attrs))
            return relax.op.add(y, norm(relax.op.reshape(shift, o_shape)))

    return FoldBN(mod).visit_expr(mod["main"])


def constants_to_params(mod):
    """Turn `main`'s tensor constants (not scalars) into trailing parameters; return the new
    module and their values."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class ConstToParam(PyExprMutator):
        def __init__(self, m):
            super().__init__(m)
            self.vars, self.values = [], []

        def visit_generic_const_(self, op):  # a relax constant (GenericConst in TVM 0.27)
            value = op.value.numpy() if hasattr(op.value, "numpy") else None
            if value is None:
                return op
            if value.ndim == 0 or value.size <= 1:
                return op
            var = relax.Var(f"edgecut_const{len(self.vars)}", op.ty)
            self.vars.append(var)
            self.values.append(value)
            return var

    main = mod["main"]
    mutator_ = ConstToParam(mod)
    body = mutator_.visit_expr(main.body)
    if not mutator_.vars:
        return mod, []
    mod["main"] = relax.Function(list(main.params) + mutator_.vars, body, main.ret_ty,
                                 main.is_pure, main.attrs)
    return mod, mutator_.values


def divide_by_weights_as_multiply(mod, num_inputs: int):
    """x / w, with w computed from weights only (batch norm's sqrt(var + eps)), becomes
    x * (1 / w): the reciprocal is lifted to compile time and the kernel's epilogue multiplies
    (a vector divide costs as much as a 1x1 convolution's 16 multiply-adds)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    divide = tvm.ir.Op.get("relax.divide")
    weights = set(mod["main"].params[num_inputs:])

    @mutator
    class DivToMul(PyExprMutator):
        def __init__(self, m):
            super().__init__(m)
            self.memo = {}

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(divide)):
                return call
            x, w = call.args
            if not weight_only(self, w, weights, self.memo) or weight_only(self, x, weights, self.memo):
                return call
            one = relax.const(1.0, w.ty.dtype)
            return relax.op.multiply(x, self.builder_.normalize(relax.op.divide(one, w)))

    return DivToMul(mod).visit_expr(mod["main"])


def clip_as_min_max(mod):
    """clip (ReLU6 imports as clip(x, 0, 6)) -> minimum(maximum(x, lo), hi): binary element-wise
    ops have layout inference, so ConvertLayout keeps them in NHWC (instead of transposing around
    each ReLU6) and FuseOps folds them into the convolution's epilogue."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    clip = tvm.ir.Op.get("relax.clip")

    @mutator
    class ClipToMinMax(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(clip)):
                return call
            x, dtype = call.args[0], call.args[0].ty.dtype
            lo, hi = (relax.const(float(a.value), dtype) for a in call.args[1:3])
            return relax.op.minimum(self.builder_.normalize(relax.op.maximum(x, lo)), hi)

    return ClipToMinMax(mod).visit_expr(mod["main"])
