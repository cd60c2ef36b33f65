"""`edgecut.compile`: the whole pipeline, and the `Artifact` it returns.

    gm = trace(model, x)                        torch.fx graph, metadata on every node
    gm = insert_exits + train_exits             right-sizing: BranchyNet exits trained on data
    gm = annotate_cost(gm, device, edge)        predicted seconds per node on both sides
    table = plan_table(gm, deadline, ...)       a first (exit, cut) plan per bandwidth range
    cands = candidates(gm, keep=table.plans)    the cuts a calibrated device may want (Pareto fronts)
    cands = code_plans(gm, cands, codecs, ...)  (exit, cut, codec): int8 scales, accuracy, bytes measured
    manifest = build_artifact(gm, table, ...)   TVM libraries per side for every candidate, ONNX, manifest
    table = solve_table(route_costs(manifest))  the final table, over the candidates as built
"""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from edgecut import targets as _targets
from edgecut.errors import PlanError, UsageError
from edgecut.frontend import meta
from edgecut.types import Link, Plan, PlanTable
from edgecut.units import format_bandwidth, format_time, parse_bandwidth, parse_time

log = logging.getLogger("edgecut")

OBJECTIVES = ("accuracy", "latency")


class RightSizingOffWarning(UserWarning):
    """compile was asked for exits but given no data to train them on."""


def compile(model, example_input, target="pi", edge="local", deadline=0.1, bandwidth=None, exits="auto",
            data=None, profile=None, objective: str = "accuracy", *, edge_profile=None, rtt=0.0,
            margin=0.0, epochs: int = 15, max_accuracy_loss: float = 0.01, num_exits: int = 5, codecs=("fp32",),
            allow_uncalibrated: bool = False, out_dir=None, backend: str = "tvm", name: str | None = None,
            progress: bool = True, edge_batches=()) -> "Artifact":
    """Compile `model` into a device/edge artifact that meets `deadline` with the best accuracy.

    target, edge: `Target` names (`edgecut.targets.known()`); profile / edge_profile: cost profiles
    (name, path or Profile; default: the target's). deadline: seconds or "100ms". bandwidth: the
    expected bandwidth (bit/s or "2mbit"), used by `Artifact.plan()` with no argument; the plan
    table covers 50 kbit/s - 1 Gbit/s regardless. exits: "auto", a list of node names, or None;
    exits are trained only when `data` is given ("digits", a (train, val[, test]) tuple of torch
    Datasets, or `edgecut.data.Splits`). `model` may also be `artifact.gm` of an earlier compile
    with exits: it is then compiled again (another deadline, another target) without retraining. objective: "accuracy" (Edgent) or "latency"
    (Neurosurgeon). margin: relative prediction error to plan for, or "p95" for the profiles'
    95th-percentile error (ALERT). rtt: the link's round trip in seconds or "20ms". codecs: how
    crossing tensors may travel (`edgecut.codecs.known()`, e.g. ("fp32", "fp16", "int8+zstd")):
    beyond fp32 each becomes a plan dimension, its accuracy measured on `data` (a loss above
    max_accuracy_loss drops it) and its bytes measured on it. edge_batches: more batch sizes
    for the edge segments (e.g. (4, 8), for `edgecut serve --ray` batching).
    """
    from edgecut.codegen.artifact import build_artifact
    from edgecut.costmodel.profile import load_profile
    from edgecut.explain import layer_rows
    from edgecut.frontend import trace
    from edgecut.frontend.tracing import require_one_output
    from edgecut.passes.annotate_cost import annotate_cost
    from edgecut.codecs import parse_all
    from edgecut.passes.candidates import candidates
    from edgecut.passes.plan_table import plan_table

    device_t, edge_t = _targets.get(target), _targets.get(edge)
    deadline, rtt = parse_time(deadline), parse_time(rtt)
    bandwidth = parse_bandwidth(bandwidth) if bandwidth is not None else None
    if objective not in OBJECTIVES:
        raise UsageError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    dev_prof = load_profile(profile or _default_profile(device_t, "device"), target=device_t)
    edge_prof = load_profile(edge_profile or _default_profile(edge_t, "edge"), target=edge_t)
    margin = max(dev_prof.error_p95, edge_prof.error_p95) if margin == "p95" else float(margin)
    codecs = parse_all(codecs)
    if len(codecs) > 1 and data is None:
        raise UsageError(f"codecs {', '.join(codecs[1:])} need data: their int8 scales and accuracy are measured on "
                         "it (pass data='digits' or (train, val) datasets), or use codecs=('fp32',)")

    clock = [("start", time.perf_counter())]                             # seconds per phase -> info

    if _trained(model):                                                  # a graph compile already right-sized
        gm, exit_info = model, dict(model.meta.get(meta.RIGHT_SIZING, {}))
    else:
        if getattr(model, "training", False):
            warnings.warn(f"{type(model).__name__} is in training mode: it is compiled as it is (dropout "
                          "active, batch norms with each request's own statistics); call model.eval() "
                          "first for inference", UserWarning, stacklevel=2)
        gm = trace(model, example_input)                                 # fx graph + layer metadata
        require_one_output(gm)                                           # one tensor: the logits
        gm, exit_info = _right_size(gm, exits, data, example_input, epochs, max_accuracy_loss, num_exits, progress)
        gm.meta[meta.RIGHT_SIZING] = exit_info
    clock.append(("trace", time.perf_counter()))
    gm = annotate_cost(gm, dev_prof, edge_prof, allow_uncalibrated)     # device/edge seconds per node
    overhead = dev_prof.message_overhead_s or edge_prof.message_overhead_s
    with warnings.catch_warnings(record=True) as caught:                # the solver's DeadlineWarning
        warnings.simplefilter("always")
        table = plan_table(gm, deadline, rtt=rtt, overhead=overhead, objective=objective, margin=margin)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    info = {"deadline": deadline, "objective": objective, "margin": margin, "rtt": rtt, "overhead": overhead,
            "bandwidth": bandwidth, "allow_uncalibrated": bool(allow_uncalibrated),
            "profiles": {"device": _prof_info(dev_prof), "edge": _prof_info(edge_prof)},
            "layers": layer_rows(gm), **exit_info,
            "warnings": [str(w.message) for w in caught]}
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="edgecut-"))
    cands = candidates(gm, keep=table.plans)                            # (exit, cut): Pareto fronts
    cands, info["codecs"] = _code(gm, cands, codecs, data, example_input, max_accuracy_loss)  # (exit, cut, codec)
    clock.append(("plan", time.perf_counter()))
    manifest = build_artifact(gm, table, device_t, edge_t, out, (example_input,), backend=backend,
                              model_name=name or type(model).__name__, progress=progress, info=info,
                              candidates=cands, edge_batches=edge_batches)
    clock.append(("build", time.perf_counter()))
    manifest = _plan_as_built(gm, manifest, dev_prof, edge_prof, rtt, overhead, objective, margin, bool(caught))
    clock.append(("table", time.perf_counter()))
    manifest.info["compile_s"] = {k: round(t - t0, 3) for (_, t0), (k, t) in zip(clock, clock[1:])}
    log.info("compiled %s in %.1f s (%s)", name or type(model).__name__, clock[-1][1] - clock[0][1],
             ", ".join(f"{k} {v:.1f} s" for k, v in manifest.info["compile_s"].items()))
    manifest.write(out)
    return Artifact(out, manifest, gm)


def _plan_as_built(gm, manifest, dev_prof, edge_prof, rtt, overhead, objective, margin, warned):
    """The manifest with every candidate's predicted seconds as built (the nodes' seconds plus one
    segment call per library call on each side), the plan table and fallback chosen among them."""
    from dataclasses import replace

    from edgecut.codegen.artifact import fallback_plan
    from edgecut.errors import DeadlineWarning
    from edgecut.passes.candidates import predict_routes
    from edgecut.planning import route_costs, solve_table

    deadline = manifest.table.deadline
    coded = manifest.info.get("codecs") or {}                           # the lossless stage's measured seconds
    manifest = replace(manifest, candidates=tuple(
        replace(p, device_s=p.device_s + coded.get(p.id, {}).get("encode_s", 0.0),
                edge_s=p.edge_s + coded.get(p.id, {}).get("decode_s", 0.0))
        for p in predict_routes(gm, manifest, dev_prof, edge_prof)))
    table = solve_table(route_costs(manifest), deadline, rtt=rtt, overhead=overhead, objective=objective,
                        margin=margin)
    every = PlanTable(tuple(float(i) for i in range(len(manifest.candidates))), manifest.candidates, deadline)
    fallback = fallback_plan(gm, every, manifest.exits)
    short = [p for p in table.plans if not p.feasible]
    if short and not warned:
        fastest = min(short, key=lambda p: p.latency_s)
        msg = (f"no plan as built meets the deadline {format_time(deadline)} at some bandwidths: the fastest there, "
               f"{fastest.id}, takes {format_time(fastest.latency_s)} with its segment calls; relax the deadline, "
               "add an earlier exit, or use a faster device or edge target")
        warnings.warn(DeadlineWarning(msg), stacklevel=3)
        manifest.info.setdefault("warnings", []).append(msg)
    return replace(manifest, table=table, fallback=fallback)


def _code(gm, cands, codecs, data, example_input, max_loss) -> tuple:
    """The candidates with their coded twins and what was measured of them (nothing beyond fp32: as is)."""
    if len(codecs) == 1:
        return cands, {}
    from edgecut.passes.codec_plans import code_plans

    train, val, _ = _splits(data, tuple(example_input.shape[1:]))
    return code_plans(gm, cands, codecs, train, val, max_loss)


def _trained(model) -> bool:
    import torch.fx

    return isinstance(model, torch.fx.GraphModule) and bool(model.meta.get(meta.EXITS))


def _default_profile(t, role: str) -> str:
    if not t.profile:
        raise UsageError(f"target {t.name!r} has no shipped cost profile: measure one on that machine with "
                         f"`edgecut profile --target {t.name} -o {t.name}.json` and pass it as the {role} profile")
    return t.profile


def _prof_info(p) -> dict:
    return {"name": p.name, "target": p.target, "calibrated": p.calibrated, "source": p.source,
            "error_p95": p.error_p95}


def _right_size(gm, exits, data, example_input, epochs, max_loss, num_exits, progress) -> tuple:
    """Insert and train exits when asked and given data; returns (graph, what was measured)."""
    if not exits:
        return gm, {}
    if data is None:
        warnings.warn("compile: exits were requested but no data was given to train them: right-sizing is "
                      "off (pass data='digits' or (train, val) datasets)", RightSizingOffWarning, stacklevel=3)
        return gm, {}
    from edgecut.exits import calibrate_thresholds, early_exit_report, evaluate, train_exits
    from edgecut.passes.insert_exits import insert_exits

    train, val, test = _splits(data, tuple(example_input.shape[1:]))
    gm = insert_exits(gm, exits, num_exits=num_exits)                    # BranchyNet heads
    train_exits(gm, train, val, epochs=epochs, progress=progress)       # joint loss; records accuracy
    report = calibrate_thresholds(gm, val, max_loss)                      # entropy thresholds per exit
    out = {"early_exit": {"fractions": list(report.fractions), "accuracy": report.accuracy, "max_loss": max_loss}}
    if test is not None:
        out["test_accuracy"] = evaluate(gm, test)
        on_test = early_exit_report(gm, test)
        out["early_exit_test"] = {"fractions": list(on_test.fractions), "accuracy": on_test.accuracy}
    return gm, out


def _splits(data, shape):
    if isinstance(data, str):
        if data != "digits":
            raise UsageError(f"unknown data set {data!r}: use 'digits' or pass (train, val[, test]) datasets")
        from edgecut.data import digits

        return tuple(digits(shape))
    parts = tuple(data)
    if len(parts) not in (2, 3):
        raise UsageError("data must be 'digits' or a (train, val) or (train, val, test) tuple of datasets")
    return parts if len(parts) == 3 else (*parts, None)


@dataclass(frozen=True)
class Simulation:
    """What `Artifact.simulate` measured: `output` (logits), the plan, the exit that answered,
    seconds measured on this machine for the device and edge parts, and the transfer seconds of
    the modelled link."""

    output: object
    plan: Plan
    exit_id: int
    early: bool
    device_s: float
    transfer_s: float
    edge_s: float
    sent_bytes: int
    device_backend: str

    @property
    def latency_s(self) -> float:
        return self.device_s + self.transfer_s + self.edge_s


class Artifact:
    """A compiled model: the artifact directory at `path`, its `manifest`, and (right after
    `compile`) the annotated graph `gm`. `Artifact.open(path)` reads a saved one."""

    def __init__(self, path, manifest, gm=None):
        self.path, self.manifest, self.gm = Path(path), manifest, gm
        self._parts: dict = {}

    @classmethod
    def open(cls, path) -> "Artifact":
        from edgecut.codegen.manifest import Manifest

        return cls(path, Manifest.read(path))

    @property
    def table(self) -> PlanTable:
        return self.manifest.table

    @property
    def info(self) -> dict:
        return self.manifest.info

    def plan(self, bandwidth=None) -> Plan:
        """The plan for `bandwidth` (bit/s or "2mbit"; default: the one given to compile)."""
        bw = bandwidth if bandwidth is not None else self.info.get("bandwidth")
        if bw is None:
            raise PlanError("no bandwidth: pass one (e.g. artifact.plan('2mbit')) or give compile(bandwidth=...)")
        return self.table.lookup(parse_bandwidth(bw))

    def save(self, directory) -> Path:
        """Copy the artifact to `directory` (created or replaced); returns its path."""
        directory = Path(directory)
        if directory.resolve() != self.path.resolve():
            if directory.exists():
                shutil.rmtree(directory)
            shutil.copytree(self.path, directory)
        return directory

    def explain(self, path="plan.png", bandwidth=None) -> str:
        """Render the per-layer cost figure with the cut and exit, and the plan table (a PNG)."""
        from edgecut.explain import render

        bw = parse_bandwidth(bandwidth) if bandwidth is not None else self.info.get("bandwidth")
        plan = self.table.lookup(bw) if bw else None
        return render(str(path), self.info.get("layers", []), self.table, plan, bandwidth=bw,
                      title=f"{self.manifest.model}: {self.summary_line(bw)}")

    def summary_line(self, bandwidth=None) -> str:
        d = self.info.get("deadline", math.inf)
        s = f"deadline {format_time(d)}" if math.isfinite(d) else "no deadline"
        if bandwidth:
            p = self.table.lookup(bandwidth)
            s += (f", at {format_bandwidth(bandwidth)}: exit {p.exit}, cut {p.cut.name}, "
                  f"{format_time(p.latency_s)} predicted{'' if p.feasible else ' (INFEASIBLE)'}")
        return s

    def _part(self, side: str):
        from edgecut.codegen.load import load

        if side not in self._parts:
            runs_here = _targets.get(self.manifest.targets[side]["name"]).runs_here
            self._parts[side] = load(self.path, side, "tvm" if runs_here else "onnxruntime")
        return self._parts[side]

    def simulate(self, x, bandwidth=None, rtt=None, early_exit: bool = True) -> Simulation:
        """Run the device part, a modelled link and the edge part in this process for input `x`
        (a numpy array or torch tensor). A side whose target cannot run here (an aarch64 device)
        runs its ONNX copy with onnxruntime. Device and edge seconds are measured on this
        machine; transfer seconds are the link model's for the bytes actually sent."""
        import numpy as np

        bw = parse_bandwidth(bandwidth) if bandwidth is not None else self.info.get("bandwidth")
        if bw is None:
            raise PlanError("simulate needs a bandwidth (e.g. bandwidth='2mbit')")
        rtt = parse_time(rtt) if rtt is not None else self.info.get("rtt", 0.0)
        link = Link(bw, rtt, self.info.get("overhead", 0.0))
        plan = self.table.lookup(bw)
        x = np.ascontiguousarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
        device = self._part("device")
        res = device.run(plan.id, {device.input_names[0]: x}, early_exit=early_exit)
        if res.done:
            return Simulation(res.outputs["logits"], plan, res.exit_id, res.exit_id != plan.exit, res.seconds,
                              0.0, 0.0, 0, device.backend)
        from edgecut.runtime.protocol import pack_tensors, unpack_tensors

        packed = pack_tensors(res.outputs, plan.codec)               # the codec's lossless stage, if any
        sent = sum(int(a.nbytes) for a in packed.values())
        edge = self._part("edge")
        out = edge.run(plan.id, unpack_tensors(packed, plan.codec))
        transfer = link.transfer_seconds(sent, int(out.outputs["logits"].nbytes))
        return Simulation(out.outputs["logits"], plan, out.exit_id, False, res.seconds, transfer, out.seconds,
                          sent, device.backend)

    def report(self) -> str:
        """A plain-text account of the artifact: profiles, exits, and the plan table."""
        info, lines = self.info, []
        lines.append(f"{self.manifest.model}: device {self.manifest.targets['device']['name']}, "
                     f"edge {self.manifest.targets['edge']['name']}, {self.summary_line()}")
        for role, p in info.get("profiles", {}).items():
            flag = "" if p["calibrated"] else "  <-- UNCALIBRATED: latencies are guesses (allow_uncalibrated=True)"
            lines.append(f"  {role} profile: {p['name']} ({p['source']}, p95 error {p['error_p95']:.0%}){flag}")
        for e in self.manifest.exits:
            lines.append(f"  exit {e.id}: accuracy {e.accuracy:.3f}, entropy threshold {e.threshold:.3g}")
        ort = {}
        for lib in self.manifest.libraries:                  # segments TVM could not build (or backend)
            if lib.backend == "onnxruntime":
                ort.setdefault(lib.segment, (lib.note, []))[1].append(lib.side)
        for seg, (note, sides) in ort.items():
            lines.append(f"  segment {seg} runs on ONNX Runtime ({', '.join(sides)}): {note or 'no reason recorded'}")
        from edgecut.explain import codec_lines

        lines += codec_lines(self.manifest.candidates, info.get("codecs") or {})
        lines.append(f"  {'bandwidth from':>15}  {'exit':>4}  {'cut':<28} {'codec':<10} {'predicted':>10}  feasible")
        for lo, p in zip(self.table.bounds, self.table.plans):
            lines.append(f"  {format_bandwidth(lo):>15}  {p.exit:>4}  {p.cut.name[:28]:<28} {p.codec:<10} "
                         f"{format_time(p.latency_s):>10}  {'yes' if p.feasible else 'NO (+' + format_time(p.shortfall_s) + ')'}")
        return "\n".join(lines)
