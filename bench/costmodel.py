"""How good are the cost model's predictions on whole models it never saw?

For each model (default resnet18, mobilenet_v2, alexnet at 1x3x224x224): the whole model is
compiled with `edgecut.codegen.build` (cached under .cache/edgecut/bench-costmodel, keyed by the
build code, TVM version and target) and timed in the Relax VM (warm-up, median of repeats);
the profile predicts it by summing `annotate_cost`'s per-node seconds. The profile (default: the
shipped `local`) is fitted from layer microbenchmarks only, so every model here is held out.
Also printed: the Edgent-style prediction (the paper's linear features, every layer charged as a
separate kernel) and the profile's per-layer cross-validated median error.

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

import numpy as np  # noqa: E402
import torch  # noqa: E402

import edgecut  # noqa: E402
from edgecut import costmodel, targets, zoo  # noqa: E402
from edgecut.costmodel import microbench as mb  # noqa: E402
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
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(shape).astype("float32"), dev)
    return mb.time_callable(vm["main"], [x, *ws], warmup=2, repeats=repeats, max_total_s=20.0)


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
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    prof = costmodel.load_profile(args.profile)
    target = targets.get(prof.target)
    print(f"profile {prof.name} ({prof.date}); per-layer CV median abs. error {prof.layer_mdape:.1%}; "
          f"error_p95 on held-out programs {prof.error_p95:.1%}")
    print(f"{'model':<14}{'measured ms':>12}{'predicted ms':>14}{'error':>8}{'edgent-style ms':>17}{'error':>8}")
    worst = 0.0
    for name in args.models.split(","):
        model, shape = zoo.get(name), zoo.default_input_shape(name)
        gm = annotate_cost(edgecut.trace(model, torch.randn(*shape)), prof, prof)
        predicted = sum(n.meta[M.DEVICE_S] for n in gm.graph.nodes)
        edgent = edgent_prediction(gm, prof)
        measured = measure_model(name, model, shape, target, args.repeats)
        err, err_e = abs(predicted - measured) / measured, abs(edgent - measured) / measured
        worst = max(worst, err)
        print(f"{name:<14}{measured * 1e3:>12.2f}{predicted * 1e3:>14.2f}{err:>8.1%}{edgent * 1e3:>17.2f}{err_e:>8.1%}",
              flush=True)
    print(f"held-out whole-model error: {worst:.1%}")


if __name__ == "__main__":
    main()
