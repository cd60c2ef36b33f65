"""Profile a target: time the layer grid, fit the regressors, check them on held-out programs,
measure model loading and the runtime's message overhead, and return a `Profile`.

`fit_profile` is the pure fitting step (samples in, Profile out), used by the tests with
synthetic timings; `profile_target` does the measuring, with a tqdm progress bar.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import platform
from collections import defaultdict
from pathlib import Path

import numpy as np
from sklearn.linear_model import LinearRegression

from edgecut.costmodel import regressors
from edgecut.costmodel.features import SHAPE, WORK, edgent_matrix, work_matrix
from edgecut.costmodel.microbench import Sample
from edgecut.costmodel.profile import Profile
from edgecut.errors import ProfileError

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


def machine_description(target) -> dict:
    import tvm

    from edgecut.codegen import build as build_module

    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith(("model name", "Model"))), "")
    except OSError:
        pass
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu,
            "cpus": os.cpu_count(), "tvm_num_threads": os.environ.get("TVM_NUM_THREADS", ""),
            "tvm": tvm.__version__, "tvm_target": str(target.tvm_target()),
            "build_py_sha256": hashlib.sha256(Path(build_module.__file__).read_bytes()).hexdigest()[:16]}


def profile_target(target="local", quick: bool = False, name: str | None = None, progress: bool = True,
                   seed: int = 0) -> Profile:
    """Measure `target` on this machine (it must run here) and return its fitted Profile."""
    import torch
    from tqdm import tqdm

    import edgecut
    from edgecut import targets
    from edgecut.costmodel import microbench as mb
    from edgecut.costmodel.loading import measure_loading, SIZES
    from edgecut.costmodel.network import measure_message_overhead
    from edgecut.passes.annotate_cost import annotate_cost
    from edgecut.frontend import meta as M

    t = targets.get(target)
    if not t.runs_here:
        raise ProfileError(f"target {t.name!r} ({t.arch}) does not run on this {platform.machine()} machine; "
                           f"run `edgecut profile --target {t.name}` on the device itself")
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    from edgecut.costmodel import heldout, kernels

    cases, pairs, chains = mb.grid(quick, seed), mb.fused_grid(quick), mb.chain_grid(quick)
    models = kernels.QUICK_MODELS if quick else kernels.MODELS
    loading_sizes = SIZES[:2] if quick else SIZES
    total = len(cases) + 2 * len(pairs) + len(models) + len(chains) + len(loading_sizes) + 2
    samples, fused, timed_models = [], [], []
    with tqdm(total=total, desc=f"profiling {t.name}", unit="layer", disable=not progress) as bar:
        for case in cases:
            bar.set_postfix_str(case.label, refresh=False)
            samples += mb.measure(case, t)
            bar.update()
        for alone, group in pairs:
            t_conv, t_group = (mb.time_built(mb.compile_module(c.module, c.shapes, t), c.shapes) for c in (alone, group))
            out = mb.layer_nodes(alone.module, alone.shapes)[0]
            fused.append((t_conv, t_group, int(np.prod(out.meta[M.SHAPE])), 2))
            bar.update(2)
        fused_s = fused_epilogue(fused)
        for model, side in models:
            bar.set_postfix_str(f"{model}@{side} kernels", refresh=False)
            got, whole, _ = kernels.model_samples(model, side, t, fused_s)
            samples += got
            timed_models.append({"name": model, "side": side, "seconds": whole})
            bar.update()
        bar.set_postfix_str("segment calls", refresh=False)
        segment = kernels.measure_segment_overhead(t)
        bar.update()
        prof = dataclasses.replace(fit_profile(samples, name or t.name, t.name, fused_s), segment=segment,
                                   samples=[heldout.sample_to_dict(s) for s in samples], models=timed_models)
        errors = []
        for case in chains:
            bar.set_postfix_str(case.label, refresh=False)
            gm = annotate_cost(edgecut.trace(case.module.eval(), *(torch.randn(*s) for s in case.shapes)), prof, prof)
            predicted = sum(n.meta[M.DEVICE_S] for n in gm.graph.nodes) + prof.segment_seconds(
                int(np.prod(case.shapes[0])), 10)
            measured = mb.time_built(mb.compile_module(case.module, case.shapes, t), case.shapes, as_segment=True)
            errors.append(abs(predicted - measured) / measured)
            bar.update()
        loading = measure_loading(t, loading_sizes, on_step=bar.update)
        net = measure_message_overhead()
        bar.update()
    lomo = heldout.leave_one_model_out(prof)
    model_errors = [r["error"] for r in lomo["models"]]
    held = {"models": lomo["models"], "kernel_mdape": lomo["kernel_mdape"], "chain_errors": errors,
            "grid_cv_mdape": prof.layer_mdape}
    layer_mdape = lomo["kernel_mdape"] if lomo["kernel_errors"] else prof.layer_mdape
    return dataclasses.replace(
        prof, loading=loading, message_overhead_s=net["overhead_s"], layer_mdape=float(layer_mdape),
        error_p95=float(np.quantile(errors + model_errors, 0.95)), held_out=held, machine=machine_description(t),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        edgecut_version=edgecut.__version__, source="measured",
        notes=(f"{'quick' if quick else 'default'} grid: {len(cases)} layers + {len(samples) - len(cases)} kernels "
               f"of {len(models)} zoo models; error_p95 over {len(errors)} held-out programs and "
               f"{len(model_errors)} zoo models predicted without their own kernels (median "
               f"{np.median(errors + model_errors):.1%}); layer_mdape: those models' kernels, held out; "
               "message overhead over loopback TCP"))
