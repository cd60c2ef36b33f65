"""tune: MetaSchedule search for the kernels of a model, kept only where it wins in the model.

`tune(mod, params, target, trials=N)` runs `prepare` (the same pipeline `build` uses, so the
kernels have the same structural hash), tunes every kernel with MetaSchedule under a budget of
`trials` measured candidates in total, with a tqdm bar, then *checks the result in place*: it
builds the model with the default schedules and with each set of candidate records, times every
kernel inside the running model (interleaved rounds, medians), keeps a record only for a kernel
it makes faster there, and finally checks the whole tuned model against the default one end to
end (and their outputs): if the tuned build is slower, no record of this model is kept. So a
tuned build is never the slower one, up to the noise of that last comparison.

Why in place: MetaSchedule's runner times a kernel alone and repeatedly, its weights hot in the
cache; in the model they come cold from memory, and a record that wins hot can lose there (the
classifier's 5 MB dense weight, 1x1 convolutions with 1.6 MB of weights: measured 30-40% slower
in MobileNetV2 although they had won the search). The runner also flushes the caches between
runs (`enable_cpu_cache_flush`) so that the search ranks candidates closer to how they run.

Folders, under `database_dir(target)` = `~/.cache/edgecut/tuning/<target>-<cpu>/` (override the
root with `EDGECUT_CACHE`):
    ./          the records `build` applies (checked in place; run_secs is the in-model time)
    search/     MetaSchedule's own database and logs (its search history, reused next time)
Earlier versions kept MetaSchedule's records in `./` and the rule schedules in `rules/`; they
are offered as candidates once more, then `rules/` is removed (a recorded rule schedule would
override a better rule of a later edgecut). Databases shipped with edgecut
(`edgecut/codegen/tuned/<target>-<cpu>/`) are read too, after the user's.

For a Raspberry Pi, pass `rpc=(tracker_host, tracker_port, device_key)` to measure candidates on
the device through `tvm.rpc`; the in-place check needs the model to run here, so with rpc the
search's best records are kept unchecked.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecut import targets as _targets
from edgecut.errors import UsageError
from edgecut.targets import Target

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).with_name("tuned")
SEARCH = "search"  # sub-folder: MetaSchedule's work dir
RULES = "rules"    # legacy sub-folder of measured rule schedules (read as candidates, then removed)
MARGIN = 0.03      # a record must make its kernel this much faster in place to be kept
FILES = ("database_workload.json", "database_tuning_record.json")


@dataclass(frozen=True)
class TuneResult:
    """What `tune` kept. default_s/tuned_s: end-to-end medians of the two builds (None when not
    checked in place, i.e. with rpc); kept/dropped: kernel names (a kernel called several times
    is listed once)."""
    path: Path
    kept: tuple[str, ...]
    dropped: tuple[str, ...]
    default_s: float | None
    tuned_s: float | None


def _key(t: Target) -> str:
    spec = t.tvm_target()
    cpu = str(spec.attrs.get("mcpu", "generic")) if "mcpu" in spec.attrs else "generic"
    return f"{t.name}-{cpu}"


def cache_root() -> Path:
    root = os.environ.get("EDGECUT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "edgecut"


def database_dir(target: Target | str) -> Path:
    """The user's tuning database folder for `target` (it may not exist yet)."""
    return cache_root() / "tuning" / _key(_targets.get(target))


def database_dirs(target: Target | str) -> list[Path]:
    """Database folders `build` reads for `target`: the user's checked records, then edgecut's
    shipped ones."""
    t = _targets.get(target)
    return [d for d in (database_dir(t), SHIPPED / _key(t)) if (d / FILES[0]).exists()]


def open_database(path: str | Path):
    """The MetaSchedule JSON database in `path`, or None if the folder holds none."""
    path = Path(path)
    wl, rec = path / FILES[0], path / FILES[1]
    if not wl.exists() or not rec.exists():
        return None
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(str(wl), str(rec), allow_missing=False)


def tune(mod, params, target: Target | str, *, trials: int, num_inputs: int = 1,
         trials_per_task: int | None = None, work_dir: str | Path | None = None,
         rpc: tuple[str, int, str] | None = None, progress: bool = True,
         timeout_s: float = 120.0, rounds: int = 100) -> TuneResult:
    """Tune the kernels of `mod` (weights as inputs, as for `build`; `params` their values) for
    `target`, keep the records that win in place, and return what was kept.

    trials: measured candidates in total, spread over the kernels (MetaSchedule's gradient task
    scheduler gives more to the kernels that take longer); trials_per_task caps one kernel
    (default: trials / number of kernels, at least 8). timeout_s bounds building and running one
    candidate (generous: the machine may be shared). rounds: interleaved runs of the in-place
    check (more: less noise, slower).
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from edgecut.codegen.build import prepare

    t = _targets.get(target)
    if not t.runs_here and rpc is None:
        raise UsageError(f"target {t.name!r} does not run on this machine: tuning measures every "
                         "candidate, so pass --rpc HOST:PORT:KEY (Python: rpc=(host, port, key)) for a "
                         "device reachable over tvm.rpc, or tune for 'local'")
    if trials < 1:
        raise UsageError(f"trials must be at least 1, got {trials}")
    main_mod, _, _ = prepare(mod, num_inputs)
    tvm_target = _with_cores(t)
    work = Path(work_dir) if work_dir else database_dir(t)
    (work / SEARCH).mkdir(parents=True, exist_ok=True)
    n_tasks = len(ms.relax_integration.extract_tasks(main_mod, tvm_target))
    per_task = trials_per_task or max(8, trials // max(1, n_tasks))
    if rpc is not None:
        host, port, key = rpc
        runner = ms.runner.RPCRunner(ms.runner.RPCConfig(tracker_host=host, tracker_port=port,
                                                         tracker_key=key))
    else:  # cold caches before every run, as the weights are in the model
        runner = ms.runner.LocalRunner(timeout_sec=timeout_s, evaluator_config=ms.runner.EvaluatorConfig(
            number=1, repeat=10, min_repeat_ms=0, enable_cpu_cache_flush=True))
    callbacks = list(ms.measure_callback.MeasureCallback.create("default"))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=min(trials, per_task * n_tasks), unit="trial",
                   desc=f"tune {t.name} ({n_tasks} kernels)")
        callbacks.append(_ProgressCallback(bar))
    try:
        search = ms.relax_integration.tune_relax(
            mod=main_mod, params={}, target=tvm_target, work_dir=str(work / SEARCH),
            max_trials_global=trials, max_trials_per_task=per_task,
            num_trials_per_iter=min(64, per_task), runner=runner, measure_callbacks=callbacks,
            builder=ms.builder.LocalBuilder(timeout_sec=timeout_s))
    finally:
        if bar is not None:
            bar.close()
    sources = [search] + [db for db in (open_database(work), open_database(work / RULES)) if db is not None]
    if rpc is not None:
        kept = _best_records(main_mod, tvm_target, sources[:1])
        _save(work, main_mod, tvm_target, kept)
        return TuneResult(work, tuple(sorted(kept)), (), None, None)
    result = select_in_place(mod, params, t, main_mod, sources, work, num_inputs=num_inputs,
                             rounds=rounds, progress=progress)
    shutil.rmtree(work / RULES, ignore_errors=True)
    return result


def _with_cores(t: Target):
    import tvm

    spec = t.tvm_target()
    if "num-cores" in spec.attrs:
        return spec
    d = dict(t.tvm, mcpu=str(spec.attrs["mcpu"])) if "mcpu" in spec.attrs else dict(t.tvm)
    d["num-cores"] = int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))
    return tvm.target.Target(d)


def _kernels(main_mod):
    """name -> normalized IRModule of every PrimFunc (the form the databases match on)."""
    import tvm
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return {gv.name_hint: _normalize_mod(f) for gv, f in main_mod.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc)}


def _best_records(main_mod, tvm_target, sources) -> dict:
    """kernel name -> the fastest valid record for it in any of `sources`, by their own times."""
    best = {}
    for name, kmod in _kernels(main_mod).items():
        for db in sources:
            rec = db.query_tuning_record(kmod, tvm_target, name)
            if rec is None or not rec.run_secs or float(rec.run_secs[0]) >= 1e9:
                continue
            if name not in best or _secs(rec) < _secs(best[name]):
                best[name] = rec
    return best


def _secs(rec) -> float:
    return float(np.mean([float(s) for s in rec.run_secs]))


def select_in_place(mod, params, target: Target | str, main_mod, sources, out_dir, *,
                    num_inputs: int = 1, rounds: int = 100, margin: float = MARGIN,
                    progress: bool = True) -> TuneResult:
    """Keep, per kernel, the record (of each source's best) that makes it fastest *inside the
    running model*, if at least `margin` faster than edgecut's rules; check the tuned model end
    to end (time and outputs) against the default build; write the kept records to `out_dir`
    (records of other models' kernels already there stay). `main_mod` is `prepare(mod)[0]`."""
    from edgecut.codegen.build import build

    t = _targets.get(target)
    tvm_target = _with_cores(t)
    kernels = _kernels(main_mod)
    x = _inputs(mod, num_inputs)
    default = build(mod, params, t, num_inputs=num_inputs, tuning_dir=False)
    run_default = _runner(default)
    ref = run_default(x)[0]
    cands, tmp = [], tempfile.mkdtemp(prefix="edgecut-tune-")
    try:
        for i, db in enumerate(sources):
            recs = _best_records(main_mod, tvm_target, [db])
            if not recs:
                continue
            d = Path(tmp) / f"cand{i}"
            _save(d, main_mod, tvm_target, recs, keep_others=False)
            run = _runner(build(mod, params, t, num_inputs=num_inputs, tuning_dir=d))
            if not _close(run(x)[0], ref):
                log.warning("tune: the records of source %d change the model's outputs; ignored", i)
                continue
            cands.append((recs, run))
        times = _kernel_times([run_default] + [c[1] for c in cands], x, rounds, progress)
        chosen, secs = {}, {}
        for name in kernels:
            t_def = times[0].get(name)
            opts = [(times[j + 1].get(name), j) for j, (recs, _) in enumerate(cands) if name in recs]
            opts = [(s, j) for s, j in opts if s is not None]
            if t_def is None or not opts:
                continue
            s, j = min(opts)
            if s < t_def * (1 - margin):
                chosen[name], secs[name] = cands[j][0][name], s
        tried = {n for recs, _ in cands for n in recs}
        default_s = tuned_s = None
        if chosen:
            d = Path(tmp) / "chosen"
            _save(d, main_mod, tvm_target, chosen, secs, keep_others=False)
            tuned = build(mod, params, t, num_inputs=num_inputs, tuning_dir=d)
            default_s, tuned_s = _end_to_end([default, tuned], x, rounds)
            if not _close(_runner(tuned)(x)[0], ref) or tuned_s > default_s:
                log.warning("tune: the tuned model ran %.3f ms against %.3f ms for the default "
                            "build; no record kept", tuned_s * 1e3, default_s * 1e3)
                chosen = {}
        _save(Path(out_dir), main_mod, tvm_target, chosen, secs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TuneResult(Path(out_dir), tuple(sorted(chosen)), tuple(sorted(tried - set(chosen))),
                      default_s, tuned_s)


def _save(path: Path, main_mod, tvm_target, records: dict, secs: dict | None = None,
          keep_others: bool = True) -> None:
    """Write `records` (kernel name -> record; run_secs replaced by `secs` where given) as the
    JSON database in `path`, replacing what it held for this module's kernels and keeping (if
    `keep_others`) the records of other kernels. The files are replaced atomically."""
    from tvm.s_tir import meta_schedule as ms

    mine = ms.database.MemoryDatabase()  # this module's kernels, matched as the databases match
    for kmod in _kernels(main_mod).values():
        mine.commit_workload(kmod)
    path.mkdir(parents=True, exist_ok=True)
    new_dir = Path(tempfile.mkdtemp(prefix=".new-", dir=path))
    new = ms.database.JSONDatabase(work_dir=str(new_dir))
    old = open_database(path) if keep_others else None
    for rec in old.get_all_tuning_records() if old is not None else []:
        if not mine.has_workload(rec.workload.mod):
            new.commit_tuning_record(ms.database.TuningRecord(
                rec.trace, new.commit_workload(rec.workload.mod), rec.run_secs, rec.target, rec.args_info))
    for name, rec in records.items():
        run_secs = [float(secs[name])] if secs and name in secs else rec.run_secs
        new.commit_tuning_record(ms.database.TuningRecord(
            rec.trace, new.commit_workload(rec.workload.mod), run_secs, tvm_target, rec.args_info))
    del new
    for f in FILES:
        src = new_dir / f
        if not src.exists():
            src.write_text("")
        os.replace(src, path / f)
    shutil.rmtree(new_dir, ignore_errors=True)


def _inputs(mod, num_inputs: int) -> list:
    rng = np.random.default_rng(0)
    return [rng.standard_normal([int(d) for d in p.ty.shape]).astype(str(p.ty.dtype))
            for p in mod["main"].params[:num_inputs]]


def _runner(built):
    """f(inputs) -> the outputs as numpy arrays, with the VM reachable as f.vm."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    ps = [tvm.runtime.tensor(p) for p in built.params]

    def run(x):
        out = vm["main"](*[tvm.runtime.tensor(a) for a in x], *ps)
        return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]
    run.vm = vm
    return run


def _close(out, ref) -> bool:
    return out.shape == ref.shape and float(np.abs(out - ref).max()) <= 1e-4 * max(float(np.abs(ref).max()), 1e-6)


def _kernel_times(runs, x, rounds: int, progress: bool) -> list[dict]:
    """Per build in `runs`: kernel name -> median seconds per inference (all its calls summed),
    from the Relax VM's instrument hook, the builds interleaved round by round."""
    acc = [dict() for _ in runs]
    for i, run in enumerate(runs):
        run.vm.set_instrument(_hook(acc[i]))
        run(x), run(x)  # warm
    for a in acc:
        a.clear()
    it = range(rounds)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="check records in place", unit="round")
    for _ in it:
        for i, run in enumerate(runs):
            for v in acc[i].values():
                v.append(0.0)
            run(x)
    return [{_kernel_name(k): float(np.median(v)) for k, v in a.items()} for a in acc]


def _hook(acc: dict):
    start = {}

    def instrument(func, sym, before, ret, *args):
        if before:
            start[sym] = time.perf_counter()
        else:
            v = acc.setdefault(sym, [0.0])  # a kernel first seen: its list starts this round
            v[-1] += time.perf_counter() - start[sym]
        return 0
    return instrument


def _kernel_name(sym: str) -> str:
    """The kernel's name in `prepare`'s module (weight-repacking kernels gain a suffix)."""
    return sym[: -len("_prepacked")] if sym.endswith("_prepacked") else sym


def _end_to_end(builts, x, rounds: int) -> list[float]:
    """Median seconds per inference of each build (fresh VMs: no instrument hook), interleaved."""
    runs = [_runner(b) for b in builts]
    ts = [[] for _ in runs]
    for _ in range(rounds):
        for i, run in enumerate(runs):
            time.sleep(0.02)
            for _ in range(3):
                t0 = time.perf_counter()
                run(x)
                ts[i].append(time.perf_counter() - t0)
    return [float(np.median(v)) for v in ts]


def _progress_callback_class():
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class ProgressCallback(ms.measure_callback.PyMeasureCallback):
        def __init__(self, bar):
            self.bar = bar

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results) -> None:
            self.bar.update(len(measure_candidates))

    return ProgressCallback


def _ProgressCallback(bar):  # noqa: N802 - builds the MetaSchedule callback lazily (no tvm import)
    return _progress_callback_class()(bar)
