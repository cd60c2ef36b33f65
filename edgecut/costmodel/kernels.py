"""Per-kernel timing of whole compiled models (the Relax VM's instrument hook), turned into
layer Samples: the fused kernels that deployment actually runs, measured in place.

A zoo model compiled by `edgecut.codegen.build` runs as a sequence of kernels; the VM calls our
hook before and after each, with the kernel's arguments (NHWC input, packed weight, epilogue
operands, output). From the shapes we rebuild the torch layer the kernel computes (a Conv2d,
depthwise or not, or a Linear), trace it with edgecut to get exactly the features `annotate_cost`
will see, and charge the kernel's time (a low quantile of runs) minus the fused epilogue (which `annotate_cost`
charges to the fused nodes). Each Sample's `source` is the model's name, so a model's latency can
be predicted by a profile fitted without its own kernels (`calibrate.refit(..., exclude=...)`).

The VM of this TVM wheel has no `profile=True`; `set_instrument` is its documented hook.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgecut.costmodel.microbench import QUANTILE, Sample, compile_module

# (zoo name, input side) per model whose kernels a profile learns from. Default and quick lists.
MODELS = (("resnet18", 224), ("alexnet", 224), ("mobilenet_v2", 224), ("vgg16", 64), ("alexnet_cifar", 32),
          ("mobilenet_v2", 160), ("resnet18", 112))
QUICK_MODELS = (("resnet18", 112), ("alexnet", 112), ("mobilenet_v2", 112), ("alexnet_cifar", 32))


@dataclass(frozen=True)
class Call:
    """One kernel call of a model run: its symbol, argument shapes and seconds."""
    name: str
    shapes: tuple
    seconds: float


def kernel_calls(vm, args, runs: int = 7, plain=None) -> tuple[list[Call], float]:
    """Seconds (`microbench.QUANTILE` of the runs) of every kernel call of `vm["main"](*args)`, in
    call order (VM builtins such as allocation and reshape are left out), and of the whole call
    (of `plain()` when given, e.g. the call as a segment with its numpy conversions).
    Hooked and plain runs alternate, so both see the same load on a shared machine; one untimed
    warm-up run of each first."""
    per_run: list[list] = []
    whole: list[float] = []
    start: list[float] = [0.0]

    def hook(func, sym, before, ret, *a):
        if sym.startswith("vm.builtin"):
            return 0
        if before:
            start[0] = time.perf_counter()
        else:
            per_run[-1].append((sym, tuple(tuple(x.shape) for x in a if hasattr(x, "shape")),
                                time.perf_counter() - start[0]))
        return 0

    try:
        for _ in range(runs + 1):
            vm.set_instrument(None)
            t0 = time.perf_counter()
            plain() if plain is not None else vm["main"](*args)
            whole.append(time.perf_counter() - t0)
            vm.set_instrument(hook)
            per_run.append([])
            vm["main"](*args)
    finally:
        vm.set_instrument(None)
    runs_ = per_run[1:]
    if not runs_ or any(len(r) != len(runs_[0]) for r in runs_):
        return [], float(np.quantile(whole[1:], QUANTILE))
    calls = [Call(sym, shapes, float(np.quantile([r[i][2] for r in runs_], QUANTILE)))
             for i, (sym, shapes, _) in enumerate(runs_[0])]
    return calls, float(np.quantile(whole[1:], QUANTILE))


def kernel_seconds(built, shapes, match: str = "conv2d", runs: int = 9, seed: int = 0) -> float | None:
    """Median seconds of the first kernel of a `Built` whose name contains `match` (a lone
    layer without the layout transforms around it), or None when there is none."""
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    rng = np.random.default_rng(seed)
    vm = relax.VirtualMachine(built.executable, dev)
    args = [tvm.runtime.tensor(rng.standard_normal(s).astype("float32"), dev) for s in shapes]
    args += [tvm.runtime.tensor(np.ascontiguousarray(p), dev) for p in built.params]
    calls, _ = kernel_calls(vm, args, runs)
    return next((c.seconds for c in calls if match in c.name), None)


def _fused_ops(call: Call) -> int:
    """fx nodes fused into this kernel's epilogue: batch norm, an activation, residual adds."""
    n = int(any(t in call.name for t in ("subtract", "divide", "multiply")))
    n += int(any(t in call.name for t in ("maximum", "minimum", "relu", "clip")))
    out = call.shapes[-1]
    return n + sum(1 for s in call.shapes[2:-1] if s == out)


def layer_of(call: Call):
    """(torch layer, input shape) that `call` computes, or None for kernels we do not model
    (max pools, whose window the shapes do not tell; layout transforms; weight preparation)."""
    shapes = call.shapes
    if len(shapes) < 2:
        return None
    x, w, out = shapes[0], shapes[1], shapes[-1]
    if "conv2d" in call.name and len(shapes) >= 3 and len(x) == 4 and len(out) == 4 and len(w) in (4, 5):
        _, h, _, cin = x
        _, ho, _, cout = out
        kh, ki = (w[1], w[3]) if len(w) == 5 else (w[0], w[2])   # [O/t, H, W, I, t] or HWIO
        groups = cin if (ki == 1 and cin > 1 and cout == cin) else 1
        stride = max(1, round(h / ho))
        return nn.Conv2d(cin, cout, kh, stride, kh // 2, groups=groups, bias=False), (1, cin, h, h)
    if "adaptive_avg_pool2d" in call.name and len(x) == 4 and len(out) == 4:
        if x[3] == out[3]:                       # NHWC
            return nn.AdaptiveAvgPool2d((out[1], out[2])), (1, x[3], x[1], x[2])
        if x[1] == out[1]:                       # NCHW
            return nn.AdaptiveAvgPool2d((out[2], out[3])), x
        return None
    if ("matmul" in call.name or "dense" in call.name) and len(shapes) >= 3:
        if len(x) == 2 and len(out) == 2 and x[0] == 1:
            return nn.Linear(x[1], out[1], bias=False), (1, x[1])
    return None


def samples_from_calls(calls: list[Call], source: str, fused_s_per_elem: float = 0.0,
                       _cache: dict | None = None, scale: float = 1.0) -> list[Sample]:
    """One Sample per conv/depthwise/linear/adaptive-pool kernel call, features from edgecut's
    own trace."""
    import edgecut
    from edgecut.costmodel.features import edgent_features, work_features
    from edgecut.frontend import meta as M

    cache = {} if _cache is None else _cache
    out = []
    for call in calls:
        layer = layer_of(call)
        if layer is None:
            continue
        module, shape = layer
        key = (repr(module), shape)
        if key not in cache:
            gm = edgecut.trace(nn.Sequential(module).eval(), torch.randn(*shape))
            node = next(n for n in gm.graph.nodes if n.meta.get(M.KIND) in (M.CONV, M.DWCONV, M.LINEAR, M.ADAPTIVE_POOL))
            cache[key] = (node.meta[M.KIND], edgent_features(node), work_features(node))
        kind, edg, work = cache[key]
        epilogue = fused_s_per_elem * work["out_elems"] * _fused_ops(call)
        seconds = scale * max(call.seconds - epilogue, 0.5 * call.seconds)
        out.append(Sample(f"{source}:{call.name}", kind, edg, dict(work), seconds, source))
    return out


def model_samples(name: str, side: int, target, fused_s_per_elem: float = 0.0, runs: int = 11):
    """Compile zoo model `name` at `side`x`side`, time it whole as one segment (numpy in and
    out) and per kernel (`microbench.QUANTILE` of the runs). Returns (samples, whole-model seconds, input shape)."""
    import tvm
    from tvm import relax

    from edgecut import zoo

    model = zoo.get(name)
    shape = (1, 3, side, side)
    built = compile_module(model, [shape], target)
    dev = tvm.cpu()
    vm = relax.VirtualMachine(built.executable, dev)
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    ws = [tvm.runtime.tensor(np.ascontiguousarray(p), dev) for p in built.params]
    main = vm["main"]
    calls, whole = kernel_calls(vm, [tvm.runtime.tensor(x, dev), *ws], runs,
                                plain=lambda: main(tvm.runtime.tensor(x, dev), *ws).numpy())
    # The hook returns to Python between kernels, which lets the thread pool go idle: hooked
    # kernels of a model with many small ones sum to more than the plain run (MobileNetV2: ~1.3x).
    # Scale them down to the plain run (never up: a slow plain run is load, not the kernels).
    hooked = sum(c.seconds for c in calls)
    scale = float(np.clip(whole / hooked, 0.5, 1.0)) if hooked > 0 else 1.0
    return samples_from_calls(calls, name, fused_s_per_elem, scale=scale), whole, shape


SEGMENT_SHAPES = ((1, 8, 8, 8), (1, 16, 16, 16), (1, 32, 28, 28), (1, 64, 28, 28), (1, 64, 56, 56),
                  (1, 128, 56, 56))


def measure_segment_overhead(target, shapes=SEGMENT_SHAPES, repeats: int = 9) -> dict:
    """What one segment call costs beyond its kernels, the way `codegen.load.Part` runs a
    segment: numpy input -> TVM tensor, `vm["main"]`, output `.numpy()`, around a 1x1 conv (so
    `build`'s NCHW <-> NHWC boundary transforms are included). Overhead = that call's time
    minus the conv kernel's, against the boundary elements (input + output). It is not linear
    (small tensors stay in cache), so `Profile.segment_seconds` interpolates the points (made
    non-decreasing) and extends them with the fitted line's slope.
    Returns {"intercept": s, "s_per_elem": s, "points": [(elems, overhead s), ...]}."""
    import tvm
    from tvm import relax

    from edgecut.costmodel.microbench import time_callable

    dev = tvm.cpu()
    points = []
    for shape in shapes:
        c = shape[1]
        built = compile_module(nn.Conv2d(c, c, 1, bias=False), [shape], target)
        vm = relax.VirtualMachine(built.executable, dev)
        x = np.random.default_rng(0).standard_normal(shape).astype("float32")
        ws = [tvm.runtime.tensor(np.ascontiguousarray(p), dev) for p in built.params]
        main = vm["main"]

        def part_run():
            out = main(tvm.runtime.tensor(np.ascontiguousarray(x), dev), *ws)
            return out.numpy()

        calls, _ = kernel_calls(vm, [tvm.runtime.tensor(x, dev), *ws], repeats)
        kernel = sum(k.seconds for k in calls if "conv2d" in k.name)
        whole = time_callable(part_run, [], warmup=2, repeats=repeats)
        points.append((2 * int(np.prod(shape)), max(whole - kernel, 0.0)))
    return fit_segment(points)


def fit_segment(points) -> dict:
    """The segment-call cost from (boundary elements, overhead s) points: a line fitted with
    relative-error weights (the small calls pin the intercept, a noisy big one cannot buy it)
    and the points made non-decreasing, as `Profile.segment_seconds` reads them."""
    from sklearn.linear_model import LinearRegression

    e, t = np.array(points, dtype=float).T
    lr = LinearRegression(positive=True).fit(e[:, None], t, sample_weight=1.0 / np.maximum(t, 1e-6) ** 2)
    slope, intercept = float(lr.coef_[0]), float(lr.intercept_)
    t = np.maximum.accumulate(t)
    return {"intercept": float(max(intercept, 0.0)), "s_per_elem": float(max(slope, 0.0)),
            "points": [[int(a), float(b)] for a, b in zip(e, t)]}
