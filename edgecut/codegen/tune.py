"""tune: MetaSchedule search for the kernels of a model, saved where `build` picks it up.

`tune(mod, params, target, trials=N)` runs `prepare` (the same pipeline `build` uses, so the
kernels have the same structural hash), tunes every kernel with MetaSchedule under a budget of
`trials` measured candidates in total, with a tqdm bar, and stores the records as a JSON
database in `database_dir(target)`: `~/.cache/edgecut/tuning/<target>-<cpu>/` (override the root
with `EDGECUT_CACHE`). Later `build` calls for the same target apply the best record of every
kernel found there, and edgecut's schedule rules for the rest. Databases shipped with edgecut
(`edgecut/codegen/tuned/<target>-<cpu>/`) are read too, after the user's.

For a Raspberry Pi, pass `rpc=(tracker_host, tracker_port, device_key)` to measure candidates on
the device through `tvm.rpc`; without it, only targets that run here can be tuned.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from edgecut import targets as _targets
from edgecut.errors import UsageError
from edgecut.targets import Target

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).with_name("tuned")
RULES = "rules"  # sub-folder holding the measured rule schedules (see record_rule_schedules)


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
    """Database folders `build` reads for `target`: the user's (MetaSchedule's records, then the
    measured rule schedules), then edgecut's shipped one."""
    t = _targets.get(target)
    roots = (database_dir(t), SHIPPED / _key(t))
    return [d for r in roots for d in (r, r / RULES) if (d / "database_workload.json").exists()]


def open_database(path: str | Path):
    """The MetaSchedule JSON database in `path`, or None if the folder holds none."""
    path = Path(path)
    wl, rec = path / "database_workload.json", path / "database_tuning_record.json"
    if not wl.exists() or not rec.exists():
        return None
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(str(wl), str(rec), allow_missing=False)


def tune(mod, params, target: Target | str, *, trials: int, num_inputs: int = 1,
         trials_per_task: int | None = None, work_dir: str | Path | None = None,
         rpc: tuple[str, int, str] | None = None, progress: bool = True,
         timeout_s: float = 120.0) -> Path:
    """Tune the kernels of `mod` (weights as inputs, as for `build`) for `target`.

    trials: measured candidates in total, spread over the kernels (MetaSchedule's gradient task
    scheduler gives more to the kernels that take longer); trials_per_task caps one kernel
    (default: trials / number of kernels, at least 8). timeout_s bounds building and running one
    candidate (generous: the machine may be shared). Returns the database folder.
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
    tvm_target = t.tvm_target()
    if "num-cores" not in tvm_target.attrs:
        spec = dict(t.tvm, mcpu=str(tvm_target.attrs["mcpu"])) if "mcpu" in tvm_target.attrs else dict(t.tvm)
        spec["num-cores"] = int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))
        tvm_target = tvm.target.Target(spec)
    work = Path(work_dir) if work_dir else database_dir(t)
    work.mkdir(parents=True, exist_ok=True)
    n_tasks = len(ms.relax_integration.extract_tasks(main_mod, tvm_target))
    per_task = trials_per_task or max(8, trials // max(1, n_tasks))
    runner = "local"
    if rpc is not None:
        host, port, key = rpc
        runner = ms.runner.RPCRunner(ms.runner.RPCConfig(tracker_host=host, tracker_port=port,
                                                         tracker_key=key))
    callbacks = list(ms.measure_callback.MeasureCallback.create("default"))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=min(trials, per_task * n_tasks), unit="trial",
                   desc=f"tune {t.name} ({n_tasks} kernels)")
        callbacks.append(_ProgressCallback(bar))
    if runner == "local":
        runner = ms.runner.LocalRunner(timeout_sec=timeout_s)
    try:
        db = ms.relax_integration.tune_relax(
            mod=main_mod, params={}, target=tvm_target, work_dir=str(work),
            max_trials_global=trials, max_trials_per_task=per_task,
            num_trials_per_iter=min(64, per_task), runner=runner, measure_callbacks=callbacks,
            builder=ms.builder.LocalBuilder(timeout_sec=timeout_s))
        if rpc is None:
            # a separate database: MetaSchedule's evolutionary search seeds itself from its own
            # database's best records and cannot replay a trace made without its sampling steps
            record_rule_schedules(main_mod, tvm_target,
                                  ms.database.JSONDatabase(work_dir=str(work / RULES)))
        del db
    finally:
        if bar is not None:
            bar.close()
    return work


def record_rule_schedules(main_mod, tvm_target, db) -> int:
    """Measure edgecut's rule schedule of every kernel and commit it to `db` as one more
    candidate, so that the database's best record per kernel is never slower than the default
    build (a short search often finds nothing better than the rules). Returns the count."""
    import numpy as np
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from edgecut.codegen.schedules import make_schedule

    n = 0
    for task in ms.relax_integration.extract_tasks(main_mod, tvm_target):
        wmod = task.dispatched[0]
        func = wmod["main"]
        try:
            with tvm_target:
                sch = make_schedule(func, tvm_target)
            one = tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")})
            lib = tvm.compile(one, target=tvm_target).jit()
            args = [tvm.runtime.tensor(np.random.default_rng(0).random([int(d) for d in b.shape]).astype(b.dtype))
                    for b in sch.mod["main"].params]
            secs = lib.time_evaluator("main", tvm.cpu(), number=5, repeat=5)(*args).results
        except Exception as e:  # noqa: BLE001 - a kernel the rules leave alone: nothing to add
            log.info("rule schedule of %s not recorded: %s", task.task_name, e)
            continue
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, db.commit_workload(wmod), [float(np.median(secs))], tvm_target,
            ms.arg_info.ArgInfo.from_prim_func(func)))
        n += 1
    return n


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
