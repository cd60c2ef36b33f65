"""Profile a target: time the layer grid, fit the regressors, check them on held-out programs,
measure model loading and the runtime's message overhead, and return a `Profile`.

`fit_profile` is the pure fitting step (samples in, Profile out), used by the tests with
synthetic timings; `profile_target` does the measuring, with a tqdm progress bar.
"""
from __future__ import annotations

import dataclasses
import datetime
from collections import defaultdict

import numpy as np
from sklearn.linear_model import LinearRegression

from edgecut.costmodel import regressors
from edgecut.costmodel.features import SHAPE, WORK, edgent_matrix, work_matrix
from edgecut.costmodel.microbench import Sample
from edgecut.costmodel.profile import Profile

MIN_SAMPLES = 3


def fit_profile(samples: list[Sample], name: str, target: str, fused_s_per_elem: float = 0.0, **fields) -> Profile:
    """Fit one regressor set per layer kind (kinds with at least MIN_SAMPLES samples), the MACs
    fallback over all samples, and the pooled per-layer cross-validated median error."""
    by_kind: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_kind[s.kind].append(s)
    kinds, mdapes = {}, []
    for kind, group in sorted(by_kind.items()):
        if len(group) < MIN_SAMPLES:
            continue
        y = np.array([s.seconds for s in group])
        rows = [s.work for s in group]
        W = work_matrix(rows)
        X = {"edgent": edgent_matrix([s.edgent for s in group]), "work": W, "elems": W[:, :3].sum(1, keepdims=True)}
        if all(set(SHAPE) <= set(r) for r in rows):
            X["shape"] = work_matrix(rows, SHAPE)
        kinds[kind] = regressors.fit_kind(X, y)
        cv = kinds[kind]["cv"].get(kinds[kind]["chosen"])
        if cv:
            mdapes += [cv["mdape"]] * len(group)
    W = work_matrix([s.work for s in samples])
    X = np.column_stack([W[:, WORK.index("macs")], W[:, WORK.index("in_elems")] + W[:, WORK.index("out_elems")]])
    lr = LinearRegression(positive=True).fit(X, [s.seconds for s in samples])
    fallback = {"s_per_mac": float(lr.coef_[0]), "s_per_elem": float(lr.coef_[1]),
                "intercept": float(max(lr.intercept_, 0.0))}
    return Profile(name=name, target=target, kinds=kinds, fused_s_per_elem=float(fused_s_per_elem),
                   fallback=fallback, layer_mdape=float(np.median(mdapes)) if mdapes else float("nan"), **fields)


def fused_epilogue(pairs: list[tuple[float, float, int, int]]) -> float:
    """Seconds per element per fused elementwise op, from (conv s, conv+ops s, out elems, ops)."""
    vals = [max(t_group - t_conv, 0.0) / (elems * ops) for t_conv, t_group, elems, ops in pairs]
    return float(np.median(vals)) if vals else 0.0


def profile_target(target="local", quick: bool = False, name: str | None = None, progress: bool = True,
                   seed: int = 0, rpc: str | None = None, tiny: bool = False) -> Profile:
    """Measure `target` and return its fitted Profile: on this machine (it must run here), or,
    with `rpc="HOST:PORT"`, on a device running a TVM RPC server (`costmodel.remote`).
    `quick`: a small grid; `tiny`: a handful of layers that checks the path (not for planning)."""
    import torch
    from tqdm import tqdm

    import edgecut
    from edgecut import targets
    from edgecut.costmodel import heldout, kernels
    from edgecut.costmodel import microbench as mb
    from edgecut.costmodel.bench import open_bench
    from edgecut.costmodel.loading import SIZES
    from edgecut.costmodel.network import measure_message_overhead
    from edgecut.frontend import meta as M
    from edgecut.passes.annotate_cost import annotate_cost

    t = targets.get(target)
    bench = open_bench(t, rpc)
    grid = "tiny" if tiny else "quick" if quick else "default"
    if tiny:
        cases, pairs, chains, models, loading_sizes = mb.tiny_grid(), [], mb.chain_grid(True)[:1], (), SIZES[:2]
    else:
        cases, pairs, chains = mb.grid(quick, seed), mb.fused_grid(quick), mb.chain_grid(quick)
        models = kernels.QUICK_MODELS if quick else kernels.MODELS
        loading_sizes = SIZES[:2] if quick else SIZES
    total = len(cases) + 2 * len(pairs) + len(models) + len(chains) + len(loading_sizes) + 2
    samples, fused, timed_models = [], [], []
    try:
        with tqdm(total=total, desc=f"profiling {t.name}", unit="layer", disable=not progress) as bar:
            for case in cases:
                bar.set_postfix_str(case.label, refresh=False)
                samples += bench.layer(case)
                bar.update()
            for alone, group in pairs:
                t_conv, t_group = (bench.time(mb.compile_module(c.module, c.shapes, t), c.shapes) for c in (alone, group))
                out = mb.layer_nodes(alone.module, alone.shapes)[0]
                fused.append((t_conv, t_group, int(np.prod(out.meta[M.SHAPE])), 2))
                bar.update(2)
            fused_s = fused_epilogue(fused)
            for model, side in models:
                bar.set_postfix_str(f"{model}@{side} kernels", refresh=False)
                got, whole = bench.model(model, side, fused_s)
                samples += got
                timed_models.append({"name": model, "side": side, "seconds": whole})
                bar.update()
            bar.set_postfix_str("segment calls", refresh=False)
            segment = bench.segment(kernels.SEGMENT_SHAPES[:2] if tiny else kernels.SEGMENT_SHAPES)
            bar.update()
            prof = dataclasses.replace(fit_profile(samples, name or t.name, t.name, fused_s), segment=segment,
                                       samples=[heldout.sample_to_dict(s) for s in samples], models=timed_models)
            errors = []
            for case in chains:
                bar.set_postfix_str(case.label, refresh=False)
                gm = annotate_cost(edgecut.trace(case.module.eval(), *(torch.randn(*s) for s in case.shapes)), prof, prof)
                predicted = sum(n.meta[M.DEVICE_S] for n in gm.graph.nodes) + prof.segment_seconds(
                    int(np.prod(case.shapes[0])), 10)
                measured = bench.time(mb.compile_module(case.module, case.shapes, t), case.shapes, as_segment=True)
                errors.append(abs(predicted - measured) / measured)
                bar.update()
            loading = bench.loading(loading_sizes, on_step=bar.update)
            net = measure_message_overhead()
            bar.update()
            machine = bench.machine()
    finally:
        bench.close()
    lomo = heldout.leave_one_model_out(prof)
    model_errors = [r["error"] for r in lomo["models"]]
    held = {"models": lomo["models"], "kernel_mdape": lomo["kernel_mdape"], "chain_errors": errors,
            "grid_cv_mdape": prof.layer_mdape}
    layer_mdape = lomo["kernel_mdape"] if lomo["kernel_errors"] else prof.layer_mdape
    n_kernels = len(samples) - len(cases)
    mdape_of = "those models' kernels, held out" if lomo["kernel_errors"] else "the grid, cross-validated"
    return dataclasses.replace(
        prof, loading=loading, message_overhead_s=net["overhead_s"], layer_mdape=float(layer_mdape),
        error_p95=float(np.quantile(errors + model_errors, 0.95)), held_out=held, machine=machine,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        edgecut_version=edgecut.__version__, source="measured",
        notes=(f"{grid} grid: {len(cases)} layers + {n_kernels} kernels of {len(models)} zoo models"
               f"{'; ' + bench.note if bench.note else ''}; error_p95 over {len(errors)} held-out programs and "
               f"{len(model_errors)} zoo models predicted without their own kernels (median "
               f"{np.median(errors + model_errors):.1%}); layer_mdape: "
               f"{mdape_of}; "
               "message overhead over loopback TCP on the host"))
