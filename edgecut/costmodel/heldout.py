"""Leave-one-model-out: refit a profile without a model's own kernels, predict that model, and
measure how wrong the predictions are (the figures a profile reports about itself).

The rule: a model is only ever predicted by regressors fitted on the layer grid and on the
kernels of *other* models. `refit(prof, exclude={"mobilenet_v2"})` gives such a profile from the
training samples stored in `prof`; `model_seconds` sums `annotate_cost`'s per-node predictions
plus one segment call (`Profile.segment_seconds`); `leave_one_model_out` does it for every model
timed while profiling and returns whole-model and per-kernel errors.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from edgecut.costmodel.microbench import Sample
from edgecut.costmodel.profile import Profile


def sample_to_dict(s: Sample) -> dict:
    return {"label": s.label, "kind": s.kind, "edgent": list(s.edgent), "work": dict(s.work),
            "seconds": s.seconds, "source": s.source}


def sample_from_dict(d: dict) -> Sample:
    return Sample(d["label"], d["kind"], tuple(d["edgent"]), dict(d["work"]), float(d["seconds"]),
                  d.get("source", "grid"))


def refit(prof: Profile, exclude=()) -> Profile:
    """`prof` refitted on its stored samples whose source is not in `exclude` (model names)."""
    from edgecut.costmodel.calibrate import fit_profile

    if not prof.samples:
        raise ValueError(f"profile {prof.name!r} stores no training samples; re-measure it with `edgecut profile`")
    exclude = set(exclude)
    samples = [sample_from_dict(d) for d in prof.samples if d.get("source", "grid") not in exclude]
    fitted = fit_profile(samples, prof.name, prof.target, prof.fused_s_per_elem)
    return dataclasses.replace(prof, kinds=fitted.kinds, fallback=fitted.fallback)


def model_seconds(prof: Profile, model, shape) -> float:
    """Predicted seconds of `model` on input `shape` run as one compiled segment."""
    import torch

    import edgecut
    from edgecut.frontend import meta as M
    from edgecut.passes.annotate_cost import annotate_cost

    gm = annotate_cost(edgecut.trace(model.eval(), torch.randn(*shape)), prof, prof)
    out = [n for n in gm.graph.nodes if n.op == "output"][0]
    out_elems = sum(int(np.prod(a.meta[M.SHAPE])) for a in out.all_input_nodes if isinstance(a.meta.get(M.SHAPE), tuple)
                    and a.meta[M.SHAPE] and isinstance(a.meta[M.SHAPE][0], int))
    return sum(n.meta[M.DEVICE_S] for n in gm.graph.nodes) + prof.segment_seconds(int(np.prod(shape)), out_elems)


def leave_one_model_out(prof: Profile) -> dict:
    """For every model in `prof.models` (timed while profiling): refit without its kernels,
    predict it whole and predict each of its kernels. Returns {"models": [{name, side, measured,
    predicted, error}], "kernel_errors": [relative errors], "kernel_mdape": median}."""
    import warnings

    from edgecut import zoo

    rows, kernel_errors = [], []
    names = sorted({m["name"] for m in prof.models})
    for name in names:
        held = refit(prof, exclude={name})
        for m in (m for m in prof.models if m["name"] == name):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                predicted = model_seconds(held, zoo.get(name), (1, 3, m["side"], m["side"]))
            rows.append({"name": name, "side": m["side"], "measured": m["seconds"], "predicted": predicted,
                         "error": abs(predicted - m["seconds"]) / m["seconds"]})
        for d in (d for d in prof.samples if d.get("source") == name):
            s = sample_from_dict(d)
            pred = held.predict(s.kind, s.edgent, s.work)
            kernel_errors.append(abs(pred - s.seconds) / s.seconds)
    return {"models": rows, "kernel_errors": kernel_errors,
            "kernel_mdape": float(np.median(kernel_errors)) if kernel_errors else float("nan")}
