"""How good are the cost model's predictions on whole models it never saw?

For each model (default resnet18, mobilenet_v2, alexnet at 1x3x224x224): the whole model is
compiled with `edgecut.codegen.build` (cached under .cache/edgecut/bench-costmodel, keyed by the
build code, TVM version and target) and timed in the Relax VM (warm-up, median of repeats);
the profile predicts it by summing `annotate_cost`'s per-node seconds plus one segment call
(`Profile.segment_seconds`). Leave-one-model-out: the profile (default: the shipped `local`,
fitted on the layer grid and on the kernels of several zoo models) is refitted from its stored
samples *without the predicted model's kernels* before predicting it (`heldout.refit`).
Also printed: the Edgent-style prediction (the paper's linear features, every layer charged as a
separate kernel, same held-out fit) and the per-layer median error on held-out models' kernels.

    python bench/costmodel.py [--profile local|PATH] [--models resnet18,mobilenet_v2,alexnet]

Last line: `held-out whole-model error: X%` (the worst model). Timings on a shared machine are
disturbed by other work: run it when the machine is quiet, and read the medians.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import warnings
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as the CLI that measured the profile

import numpy as np  # noqa: E402
import torch  # noqa: E402

import edgecut  # noqa: E402
from edgecut import costmodel, targets, zoo  # noqa: E402
from edgecut.costmodel import heldout, microbench as mb  # noqa: E402
from edgecut.costmodel.features import edgent_features, work_features  # noqa: E402
from edgecut.frontend import meta as M  # noqa: E402
from edgecut.passes.annotate_cost import annotate_cost  # noqa: E402

CACHE = Path(os.environ.get("EDGECUT_CACHE", Path.cwd() / ".cache" / "edgecut")) / "bench-costmodel"


def build_key(name: str, shape, target) -> str:
    """Changes whenever the build code (build.py, schedules/), TVM or the target changes."""
    import tvm

    codegen = Path(edgecut.__file__).parent / "codegen"
    h = hashlib.sha256(f"{name}{shape}{tvm.__version__}{target.tvm_target()}".encode())
    for f in sorted([codegen / "build.py", codegen / "importer.py", *(codegen / "schedules").rglob("*.py")]):
        if f.exists():
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def measure_model(name: str, model, shape, target, repeats: int = 10) -> float:
    """Median seconds of the whole model compiled by edgecut's build (cached library)."""
    import tvm
    from tvm import relax

    d = CACHE / f"{name}-{build_key(name, shape, target)}"
    so, params = d / "model.so", d / "params.npz"
    if not so.exists():
        built = mb.compile_module(model, [shape], target)
        d.mkdir(parents=True, exist_ok=True)
        np.savez(params, **{f"p{i:04d}": p for i, p in enumerate(built.params)})
        built.executable.export_library(str(so))
    dev = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(so)), dev)
    with np.load(params) as z:
        ws = [tvm.runtime.tensor(z[k], dev) for k in sorted(z.files)]
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    main = vm["main"]

    def as_segment():  # as `codegen.load.Part` runs a segment: numpy in, numpy out
        return main(tvm.runtime.tensor(x, dev), *ws).numpy()
    return mb.time_callable(as_segment, [], warmup=2, repeats=repeats, max_total_s=20.0)


def edgent_prediction(gm, prof) -> float:
    """Edgent's way: every layer a separate kernel, predicted by the paper's linear features."""
    total = 0.0
    for n in gm.graph.nodes:
        kind = n.meta[M.KIND]
        if kind in M.NO_COST_KINDS:
            continue
        if prof.has(kind) and "edgent" in prof.kinds[kind]["models"]:
            total += prof.predict(kind, edgent_features(n), work_features(n), method="edgent")
        else:
            total += prof.fallback_seconds(work_features(n))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="local")
    ap.add_argument("--models", default="resnet18,mobilenet_v2,alexnet")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    prof = costmodel.load_profile(args.profile)
    target = targets.get(prof.target)
    print(f"profile {prof.name} ({prof.date}, build.py {prof.machine.get('build_py_sha256', '?')}); per-layer "
          f"median abs. error on held-out models' kernels {prof.layer_mdape:.1%}; error_p95 on held-out "
          f"programs and models {prof.error_p95:.1%}")
    if not prof.samples:
        print("(this profile stores no samples: it cannot be refitted without each model, so the models "
              "below are predicted by the profile as it is)")
    print(f"{'model':<14}{'measured ms':>12}{'predicted ms':>14}{'error':>8}{'edgent-style ms':>17}{'error':>8}")
    worst = 0.0
    for name in args.models.split(","):
        model, shape = zoo.get(name), zoo.default_input_shape(name)
        held = heldout.refit(prof, exclude={name}) if prof.samples else prof
        gm = annotate_cost(edgecut.trace(model, torch.randn(*shape)), held, held)
        predicted = heldout.model_seconds(held, model, shape)
        edgent = edgent_prediction(gm, held)
        measured = measure_model(name, model, shape, target, args.repeats)
        err, err_e = abs(predicted - measured) / measured, abs(edgent - measured) / measured
        worst = max(worst, err)
        print(f"{name:<14}{measured * 1e3:>12.2f}{predicted * 1e3:>14.2f}{err:>8.1%}{edgent * 1e3:>17.2f}{err_e:>8.1%}",
              flush=True)
    print(f"held-out whole-model error: {worst:.1%}")


if __name__ == "__main__":
    main()
