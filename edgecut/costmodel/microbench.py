"""Layer microbenchmarks: a grid of layers of every kind, compiled with `edgecut.codegen.build`
(the same TVM pipeline deployment uses) and timed in the Relax VM with warm-up and a low quantile of repeated runs (`QUANTILE`).

`grid(quick)` lists the layers (deterministic; shapes drawn log-uniformly around those of image
models, never copied from a particular model), `measure(case, target)` times one, and
`compile_module`/`time_built` are the primitives the benchmarks reuse for whole models.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from edgecut.frontend import meta as M


@dataclass(frozen=True)
class Case:
    """One thing to time: `module` run on inputs of `shapes`; `label` says what it is."""
    label: str
    module: nn.Module = field(compare=False, hash=False)
    shapes: tuple


@dataclass(frozen=True)
class Sample:
    """A measured layer: its kind, Edgent features, work features, seconds, and where it
    was measured (`source`: "grid" for the layer grid, else the zoo model whose kernel it is)."""
    label: str
    kind: str
    edgent: tuple
    work: dict = field(hash=False)
    seconds: float
    source: str = "grid"


class _Add(nn.Module):
    def forward(self, x, y):
        return x + y


class _Mul(nn.Module):
    def forward(self, x, y):
        return x * y


class _Cat(nn.Module):
    def forward(self, x, y):
        return torch.cat([x, y], 1)


def _rooted(module: nn.Module) -> nn.Module:
    """A torch layer traced as the root would be traced through (BatchNorm's shape checks break
    symbolic tracing); wrapped in a Sequential it stays one leaf `call_module` node."""
    if type(module).__module__.startswith("torch.nn") and not isinstance(module, nn.Sequential):
        return nn.Sequential(module)
    return module


def compile_module(module: nn.Module, shapes, target, tuning_dir=False):
    """Import `module` (torch.fx, weights as inputs) the way codegen imports a segment, and
    `build` it for `target`: the deployed pipeline. By default with the rule schedules only
    (`tuning_dir=False`): a profile describes the untuned build, which a tuned one never loses
    to, and opening a large tuning database costs seconds per layer."""
    from edgecut.codegen.build import build
    from edgecut.codegen.importer import import_segment

    gm = torch.fx.symbolic_trace(_rooted(module).eval())
    with torch.no_grad():
        mod, params = import_segment(gm, [(tuple(s), "float32") for s in shapes])
    return build(mod, params, target, num_inputs=len(shapes), tuning_dir=tuning_dir)


# Timings are this quantile of repeated runs, not the median: on a shared machine other jobs
# preempt some runs, and medians of the same program swung 2-3x between minutes. The low quantile
# is what the code takes when it is not preempted, and it is reproducible.
QUANTILE = 0.2


def time_callable(f, args, warmup: int = 1, repeats: int = 5, min_total_s: float = 0.05,
                  max_total_s: float = 2.0) -> float:
    """Seconds of `f(*args)` (the `QUANTILE` of the runs): `warmup` untimed calls, then at least
    `repeats` timed ones, more until `min_total_s` has passed (small kernels), fewer past
    `max_total_s` (at least 3)."""
    for _ in range(warmup):
        f(*args)
    times: list[float] = []
    total = 0.0
    while len(times) < repeats or (total < min_total_s and len(times) < 500):
        t0 = time.perf_counter()
        f(*args)
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
        if total > max_total_s and len(times) >= 3:
            break
    return float(np.quantile(times, QUANTILE))


_FLUSH: list = []


def _flush_caches(nbytes: int = 64 << 20) -> None:
    """Evict the CPU caches (write a buffer larger than any L3) between timed runs."""
    if not _FLUSH:
        _FLUSH.append(np.zeros(nbytes // 8))
    _FLUSH[0] += 1.0


def time_built(built, shapes, seed: int = 0, as_segment: bool = False, cold: bool = False, **kw) -> float:
    """Median seconds of one call of a `Built` executable on random inputs of `shapes`. With
    `as_segment`, each call also converts its numpy inputs to TVM tensors and its output back to
    numpy, as `codegen.load.Part` runs a segment (what `Profile.segment_seconds` accounts for).
    With `cold`, the caches are flushed before every timed run (used for dense layers)."""
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    rng = np.random.default_rng(seed)
    vm = relax.VirtualMachine(built.executable, dev)
    xs = [rng.standard_normal(s).astype("float32") for s in shapes]
    ws = [tvm.runtime.tensor(np.ascontiguousarray(p), dev) for p in built.params]
    if as_segment:
        main = vm["main"]

        def run():
            out = main(*(tvm.runtime.tensor(x, dev) for x in xs), *ws)
            return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]
        return time_callable(run, [], **kw)
    args = [tvm.runtime.tensor(x, dev) for x in xs] + ws
    if cold:   # a dense layer in a model streams weights the previous kernels evicted from cache
        main, times = vm["main"], []
        main(*args)
        for _ in range(kw.get("repeats", 7)):
            _flush_caches()
            t0 = time.perf_counter()
            main(*args)
            times.append(time.perf_counter() - t0)
        return float(np.quantile(times, QUANTILE))
    return time_callable(vm["main"], args, **kw)


def layer_nodes(module: nn.Module, shapes):
    """The annotated compute nodes of `module` traced by edgecut (for features and kinds)."""
    import edgecut

    xs = [torch.randn(*s) for s in shapes]
    gm = edgecut.trace(_rooted(module).eval(), *xs)
    return [n for n in gm.graph.nodes if n.meta.get(M.KIND) not in M.NO_COST_KINDS]


class _ToNHWC(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1).contiguous()


def layout_seconds(shapes, target) -> float:
    """Seconds of NCHW->NHWC transposes of `shapes`. `build` runs convolutions channels-last, so
    a conv compiled alone pays a layout transform of its input and of its output, which inside a
    model happen once at its boundary, not per layer: measured here to be subtracted."""
    return sum(time_built(compile_module(_ToNHWC(), [s], target), [s]) for s in shapes)


def measure(case: Case, target) -> list[Sample]:
    """Time `case` and return one Sample per compute node (a single-layer case gives one).
    A lone convolution is timed as its kernel alone (`kernels.kernel_seconds`), without the
    boundary layout transforms `build` adds around it (a whole model pays those once)."""
    from edgecut.costmodel.features import edgent_features, work_features

    from edgecut.costmodel.kernels import kernel_seconds

    nodes = layer_nodes(case.module, case.shapes)
    built = compile_module(case.module, case.shapes, target)
    seconds = None
    if len(nodes) == 1 and nodes[0].meta[M.KIND] in (M.CONV, M.DWCONV):
        seconds = kernel_seconds(built, case.shapes, "conv2d")
    if seconds is None and len(nodes) == 1 and nodes[0].meta[M.KIND] == M.LINEAR:
        seconds = time_built(built, case.shapes, cold=True)
    if seconds is None:
        seconds = time_built(built, case.shapes)
    return [Sample(case.label, n.meta[M.KIND], edgent_features(n), work_features(n), seconds) for n in nodes]


# --- the grid -----------------------------------------------------------------------------------
_CH = (3, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512)
_HW = (7, 8, 13, 14, 16, 27, 28, 32, 55, 56, 64, 112, 224)


def _conv(rng, max_macs, depthwise=False):
    while True:
        hw = int(rng.choice(_HW))
        k = int(rng.choice((3, 5)) if depthwise else rng.choice((1, 1, 3, 3, 3, 5, 7, 11)))
        s = int(rng.choice((1, 1, 2) if k < 7 else (2, 4)))
        cin = int(rng.choice(_CH[1:])) if depthwise else int(rng.choice(_CH))
        cout = cin if depthwise else int(rng.choice(_CH[2:]))
        if hw < k:
            continue
        ho = (hw + 2 * (k // 2) - k) // s + 1
        macs = ho * ho * cout * (1 if depthwise else cin) * k * k
        if macs <= max_macs:
            conv = nn.Conv2d(cin, cout, k, s, k // 2, groups=cin if depthwise else 1, bias=not depthwise)
            return Case(f"{'dw' if depthwise else ''}conv{cin}-{cout}k{k}s{s}@{hw}", conv, ((1, cin, hw, hw),))


def _chan(rng, lo=8, hi=1280) -> int:
    """A channel count drawn log-uniformly in [lo, hi]; mostly multiples of 8 (as in image
    models), sometimes not, so the fits see how vector-width divisibility matters."""
    c = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    return max(1, int(round(c / 8) * 8) if rng.random() < 0.8 else int(round(c)))


def _thin(rng, max_macs, depthwise: bool) -> Case:
    """A depthwise 3x3/5x5 or a pointwise 1x1 conv of the widths and maps inverted-residual
    networks use (channels up to 1280, maps 7 to 112): the kernels whose efficiency varies most."""
    while True:
        hw = int(rng.choice((7, 10, 14, 20, 28, 40, 56, 80, 112)))
        cin = _chan(rng, 16, 1280)
        if depthwise:
            k, s, cout = int(rng.choice((3, 3, 3, 5))), int(rng.choice((1, 1, 2))), cin
        else:
            k, s, cout = 1, 1, _chan(rng, 16, 1280)
        ho = (hw + 2 * (k // 2) - k) // s + 1
        macs = ho * ho * cout * (1 if depthwise else cin) * k * k
        if macs <= max_macs and cin * hw * hw <= 3_000_000:
            conv = nn.Conv2d(cin, cout, k, s, k // 2, groups=cin if depthwise else 1, bias=False)
            return Case(f"{'dw' if depthwise else 'pw'}conv{cin}-{cout}k{k}s{s}@{hw}", conv, ((1, cin, hw, hw),))


def _map(rng, max_elems=2_000_000):
    while True:
        c, hw = int(rng.choice(_CH[1:])), int(rng.choice(_HW))
        if c * hw * hw <= max_elems:
            return c, hw


def grid(quick: bool = False, seed: int = 0, max_macs: float = 4e8) -> list[Case]:
    """The layers to time. Default: ~280 cases; quick: ~75."""
    rng = np.random.default_rng(seed)
    n = (lambda d, q: q if quick else d)
    cases = [_conv(rng, max_macs) for _ in range(n(100, 20))]
    cases += [_conv(rng, max_macs / 4, depthwise=True) for _ in range(n(20, 5))]
    cases += [_thin(rng, max_macs / 4, depthwise=True) for _ in range(n(30, 6))]
    cases += [_thin(rng, max_macs, depthwise=False) for _ in range(n(30, 6))]
    for _ in range(n(26, 7)):
        fi, fo = int(rng.choice((128, 256, 512, 1024, 1280, 2048, 4096, 9216))), int(
            rng.choice((10, 100, 256, 512, 1000, 1024, 2048, 4096)))
        cases.append(Case(f"linear{fi}-{fo}", nn.Linear(fi, fo), ((1, fi),)))
    for _ in range(n(10, 4)):
        c, hw = _map(rng, 4_000_000)
        k = int(rng.choice((2, 3)))
        cases.append(Case(f"maxpool{k}s2@{c}x{hw}", nn.MaxPool2d(k, 2, k // 2 if k == 3 else 0), ((1, c, hw, hw),)))
    for _ in range(n(6, 3)):
        c, hw = _map(rng)
        cases.append(Case(f"avgpool2@{c}x{hw}", nn.AvgPool2d(2, 2), ((1, c, hw, hw),)))
    for _ in range(n(8, 3)):
        c, hw = _map(rng)
        out = int(rng.choice((1, 1, 6))) if hw >= 6 else 1
        cases.append(Case(f"adaptivepool{out}@{c}x{hw}", nn.AdaptiveAvgPool2d(out), ((1, c, hw, hw),)))
    unary = {"relu": nn.ReLU, "activation": nn.ReLU6, "bn": nn.BatchNorm2d, "dropout": nn.Dropout,
             "lrn": lambda c: nn.LocalResponseNorm(5), "reshape": lambda c: nn.Flatten()}
    for name, make in unary.items():
        for _ in range(n(8, 3) if name not in ("dropout", "reshape") else n(4, 3)):
            c, hw = _map(rng)
            mod = make(c) if name in ("bn", "lrn", "reshape") else make()
            cases.append(Case(f"{name}@{c}x{hw}", mod, ((1, c, hw, hw),)))
    for name, cls in (("add", _Add), ("mul", _Mul), ("concat", _Cat)):
        for _ in range(n(6, 3)):
            c, hw = _map(rng)
            cases.append(Case(f"{name}@{c}x{hw}", cls(), ((1, c, hw, hw),) * 2))
    return cases


def tiny_grid() -> list[Case]:
    """Three small convolutions (one layer kind, enough to fit it): checks that a profiling path
    works end to end in seconds; a profile fitted on it is not for planning."""
    return [Case("conv8-16k3s1@16", nn.Conv2d(8, 16, 3, 1, 1), ((1, 8, 16, 16),)),
            Case("conv16-16k1s1@16", nn.Conv2d(16, 16, 1), ((1, 16, 16, 16),)),
            Case("conv16-32k3s2@16", nn.Conv2d(16, 32, 3, 2, 1), ((1, 16, 16, 16),))]


def fused_grid(quick: bool = False, seed: int = 1) -> list[tuple[Case, Case]]:
    """(conv alone, conv+batchnorm+relu) pairs: their difference is the cost of a fused epilogue."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(6 if quick else 10):
        c = _conv(rng, 1e8)
        conv = c.module
        group = nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU())
        pairs.append((c, Case(c.label + "+bn+relu", group, c.shapes)))
    return pairs


def chain_grid(quick: bool = False, seed: int = 2) -> list[Case]:
    """Small random programs (conv/bn/relu blocks, depthwise blocks, pools, a linear head) used
    as held-out checks of whole-program predictions; none of them is in the layer grid."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(3 if quick else 12):
        c, hw = int(rng.choice((8, 16, 32))), int(rng.choice((28, 32, 56)))
        shape = (1, c, hw, hw)
        layers: list[nn.Module] = []
        for _ in range(int(rng.integers(2, 5))):
            r = rng.random()
            if r < 0.5:
                co, k = int(rng.choice((16, 32, 64, 96))), int(rng.choice((1, 3)))
                layers += [nn.Conv2d(c, co, k, padding=k // 2, bias=False), nn.BatchNorm2d(co),
                           nn.ReLU()]
                c = co
            elif r < 0.75:
                layers += [nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU6()]
            elif hw >= 8:
                layers.append(nn.MaxPool2d(2))
                hw //= 2
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
        cases.append(Case(f"chain{i}", nn.Sequential(*layers), (shape,)))
    return cases
