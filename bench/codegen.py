"""bench/codegen.py: TVM (edgecut default schedules and tuned) vs PyTorch eager vs ONNX Runtime.

All engines use 2 threads (TVM_NUM_THREADS, torch.set_num_threads, ORT intra-op threads), batch
1, 224x224. Runs are interleaved (one round = a few runs of every engine, in turn) and the
medians are reported, because the machine is shared. "tuned" applies the MetaSchedule database
of `edgecut tune` (the user's cache, then the databases shipped in edgecut/codegen/tuned); it is
"n/a" when no database holds a record for the model's kernels.

    python bench/codegen.py [--models alexnet resnet18 mobilenet_v2] [--rounds 7] [--profile]

--profile prints the 12 slowest kernels per model (time per call summed over the model, from
the Relax VM's instrument hook). The last two lines are `worst tvm/ort ratio: ...` and
`worst tvm/eager ratio: X (default), Y (tuned)`.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")
THREADS = int(os.environ["TVM_NUM_THREADS"])

import numpy as np  # noqa: E402
import torch  # noqa: E402

from edgecut import zoo  # noqa: E402

torch.set_num_threads(THREADS)


def import_relax(model, shape):
    import tvm.relax.frontend.torch  # noqa: F401
    from tvm import relax

    with torch.no_grad():
        mod = relax.frontend.torch.from_fx(torch.fx.symbolic_trace(model), [(shape, "float32")],
                                           keep_params_as_input=True)
    return relax.frontend.detach_params(mod)


def tvm_runner(built):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    ps = [tvm.runtime.tensor(p) for p in built.params]

    def run(x):
        out = vm["main"](tvm.runtime.tensor(x), *ps)
        return out.numpy() if hasattr(out, "numpy") else out[0].numpy()
    return run, vm, ps


PAUSE_S = 0.3   # before each engine's block in a round: the previous engine's threads park


def ort_runner(model, x):
    import onnxruntime as ort

    path = os.path.join(tempfile.mkdtemp(prefix="edgecut-bench-"), "m.onnx")
    with torch.no_grad():
        torch.onnx.export(model, (torch.from_numpy(x),), path, input_names=["x"], dynamo=False,
                          opset_version=17, do_constant_folding=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return lambda a: sess.run(None, {"x": a})[0]


def has_records(model_mod, target="local") -> bool:
    """True when a tuning database for `target` holds a record for one of the model's kernels."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from edgecut import targets
    from edgecut.codegen import tune
    from edgecut.codegen.build import prepare

    dbs = [db for db in (tune.open_database(d) for d in tune.database_dirs(target)) if db is not None]
    if not dbs:
        return False
    tasks = ms.relax_integration.extract_tasks(prepare(model_mod)[0], targets.get(target).tvm_target())
    return any(db.has_workload(tk.dispatched[0]) for tk in tasks for db in dbs)


def profile(vm, ps, x, top=12):
    """Slowest kernels: seconds per inference, summed over calls, median of 5 inferences."""
    import tvm

    acc, start = collections.defaultdict(list), {}

    def instrument(func, sym, before, ret, *args):
        if before:
            start[sym] = time.perf_counter()
        else:
            acc[sym].append(time.perf_counter() - start[sym])
        return 0
    vm.set_instrument(tvm.runtime.convert(instrument) if hasattr(tvm.runtime, "convert") else instrument)
    xi = tvm.runtime.tensor(x)
    for _ in range(6):
        vm["main"](xi, *ps)
    per = {k: float(np.sum(v[len(v) // 6:])) / 5 for k, v in acc.items()}
    total = sum(per.values())
    rows = sorted(per.items(), key=lambda kv: -kv[1])[:top]
    return total, rows


def measure(engines: dict, x, rounds: int, per_round: int) -> dict:
    """Interleaved timing: every round runs each engine `per_round` times, in turn, each block
    after a pause: the engines' thread pools spin after their work (PyTorch's OpenMP for up to
    200 ms, ONNX Runtime's and TVM's for less), and without it every engine ran against the
    previous one's spinning threads on the 2 cores (ONNX Runtime, right after eager, read
    3.1-11.5 ms for the same MobileNetV2 from run to run)."""
    times = {k: [] for k in engines}
    for f in engines.values():  # warm up
        f(x), f(x)
    for _ in range(rounds):
        for k, f in engines.items():
            time.sleep(PAUSE_S)
            for _ in range(per_round):
                t0 = time.perf_counter()
                f(x)
                times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv=None):
    from edgecut.codegen.build import build

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["alexnet", "resnet18", "mobilenet_v2"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--per-round", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="print the slowest kernels per model")
    args = ap.parse_args(argv)

    worst = {"default": 0.0, "tuned": 0.0}
    worst_ort = {"default": 0.0, "tuned": 0.0}
    rows = []
    print(f"threads={THREADS}, batch 1, 224x224, load average {os.getloadavg()[0]:.1f} "
          "(the machine is shared: other processes disturb every number)")
    for name in args.models:
        torch.manual_seed(0)
        shape = zoo.default_input_shape(name)
        model = zoo.settle_batchnorm(zoo.get(name), (2, *shape[1:]))   # else MobileNetV2's logits are its bias
        x = np.random.default_rng(0).standard_normal(shape).astype("float32")
        mod, params = import_relax(model, shape)
        t0 = time.perf_counter()
        default = build(mod, params["main"], "local", tuning_dir=False)
        t_build = time.perf_counter() - t0
        engines = {"tvm_default": tvm_runner(default)[0]}
        tuned = None
        if has_records(mod):
            tuned = build(mod, params["main"], "local")
            engines["tvm_tuned"] = tvm_runner(tuned)[0]

        def eager(a, m=model):
            with torch.no_grad():
                return m(torch.from_numpy(a)).numpy()
        engines["eager"] = eager
        engines["ort"] = ort_runner(model, x)
        ref = eager(x)
        scale = float(np.abs(ref).max()) or 1.0
        errs = {k: float(np.abs(engines[k](x) - ref).max()) / scale for k in engines if k.startswith("tvm")}
        med = measure(engines, x, args.rounds, args.per_round)
        r_def = med["tvm_default"] / med["eager"]
        r_tun = med["tvm_tuned"] / med["eager"] if tuned else float("nan")
        worst["default"] = max(worst["default"], r_def)
        best = "tvm_tuned" if tuned else "tvm_default"   # without a database, tuned is the default build
        worst["tuned"] = max(worst["tuned"], med[best] / med["eager"])
        worst_ort["default"] = max(worst_ort["default"], med["tvm_default"] / med["ort"])
        worst_ort["tuned"] = max(worst_ort["tuned"], med[best] / med["ort"])
        rows.append((name, med, r_def, r_tun, errs, t_build))
        print(f"{name:14s} default {med['tvm_default']*1e3:7.1f} ms | tuned "
              f"{med['tvm_tuned']*1e3 if tuned else float('nan'):7.1f} ms | eager {med['eager']*1e3:7.1f} ms"
              f" | ort {med['ort']*1e3:7.1f} ms | default/eager {r_def:.2f} tuned/eager {r_tun:.2f}"
              f" | default/ort {med['tvm_default'] / med['ort']:.2f}"
              f" tuned/ort {(med['tvm_tuned'] / med['ort']) if tuned else float('nan'):.2f}"
              f" | rel err {max(errs.values()):.1e} | build {t_build:.1f} s", flush=True)
        if args.profile:
            _, vm, ps = tvm_runner(tuned or default)
            total, top = profile(vm, ps, x)
            for sym, sec in top:
                print(f"    {sec*1e3:7.2f} ms {100*sec/total:5.1f}%  {sym}")
    print(f"worst tvm/ort ratio: {worst_ort['default']:.2f} (default), {worst_ort['tuned']:.2f} "
          "(tuned, or default where no database applies)")
    print(f"worst tvm/eager ratio: {worst['default']:.2f} (default), {worst['tuned']:.2f} "
          "(tuned, or default where no database applies)")


if __name__ == "__main__":
    sys.exit(main())
