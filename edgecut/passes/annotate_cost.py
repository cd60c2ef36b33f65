"""annotate_cost: predicted device and edge seconds of every node, from two `Profile`s.

Reads: `meta.KIND`, `meta.FEATURES`, `meta.MACS`, `meta.IN_ELEMS`, `meta.SHAPE`, `meta.PARAMS`,
`meta.MODULE_TYPE` (run `edgecut.passes.analyze` first; `edgecut.trace` does).
Writes: `meta.DEVICE_S` and `meta.EDGE_S` on every node (0 for input, output and param nodes),
and `gm.meta[meta.COST]` (which profiles, whether calibrated, their error_p95).

An elementwise node that TVM fuses into its producer's kernel (relu/bn/add after a conv, say)
costs only the profile's fused epilogue per element, not a standalone kernel. A kind the profile
has no regressor for gets the profile's MACs-based estimate and a warning, never a silent zero.
An uncalibrated profile raises `ProfileError` unless `allow_uncalibrated=True`.
"""
from __future__ import annotations

import warnings

import torch.fx as fx

from edgecut.costmodel.features import edgent_features, folded_into_conv, fused_into, work_features
from edgecut.costmodel.profile import Profile, check_calibrated, load_profile
from edgecut.frontend import meta as M


def node_seconds(node: fx.Node, prof: Profile, missing: dict | None = None) -> float:
    """Predicted seconds of one annotated node under `prof`."""
    kind = node.meta[M.KIND]
    if kind in M.NO_COST_KINDS:
        return 0.0
    if folded_into_conv(node):
        return 0.0
    work = work_features(node)
    if fused_into(node):
        return prof.fused_s_per_elem * work["out_elems"]
    if not prof.has(kind):
        if missing is not None:
            missing.setdefault(kind, []).append(node.name)
        return prof.fallback_seconds(work)
    return prof.predict(kind, edgent_features(node), work)


def annotate_cost(gm: fx.GraphModule, device: Profile | str, edge: Profile | str,
                  allow_uncalibrated: bool = False) -> fx.GraphModule:
    """Write `meta.DEVICE_S` / `meta.EDGE_S` on every node of `gm`, predicted by the profiles."""
    profiles = {"device": load_profile(device), "edge": load_profile(edge)}
    for role, prof in profiles.items():
        check_calibrated(prof, allow_uncalibrated, role)
    missing: dict = {}
    for n in gm.graph.nodes:
        if M.KIND not in n.meta:
            raise ValueError(f"node {n.name!r} has no {M.KIND!r}; run edgecut.passes.analyze first")
        n.meta[M.DEVICE_S] = node_seconds(n, profiles["device"], missing)
        n.meta[M.EDGE_S] = node_seconds(n, profiles["edge"], missing)
    for kind, names in missing.items():
        warnings.warn(f"annotate_cost: no regressor for layer kind {kind!r} (nodes {', '.join(sorted(set(names))[:5])}"
                      f"{'...' if len(set(names)) > 5 else ''}); using a MACs-based estimate. Re-profile with "
                      "`edgecut profile` to measure it", stacklevel=2)
    uncal = [p.name for p in profiles.values() if not p.calibrated]
    if uncal:
        warnings.warn(f"annotate_cost: planning with UNCALIBRATED profile(s) {', '.join(uncal)} "
                      "(allow_uncalibrated=True): latencies are guesses", stacklevel=2)
    gm.meta[M.COST] = {role: {"profile": p.name, "calibrated": p.calibrated, "error_p95": p.error_p95,
                              "source": p.source} for role, p in profiles.items()}
    gm.meta[M.COST]["uncalibrated"] = uncal
    return gm
