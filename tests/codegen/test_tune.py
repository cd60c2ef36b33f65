"""Tuning keeps only what wins inside the model: real builds, real in-place timing, records
crafted to win MetaSchedule's (hot, isolated) measurement but lose in the model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgecut.codegen import tune as T
from edgecut.codegen.build import build, prepare
from vmrun import import_relax


def _import(model, shape):
    mod, params = import_relax(model.eval(), shape)
    return mod, params["main"]


def _naive_records(main_mod, tvm_target, hot_secs=1e-9):
    """A record for every kernel that replays *no* schedule (scalar loops, one thread) but claims
    to have run in `hot_secs`: what a search keeps when its runner flatters a candidate."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    db = ms.database.MemoryDatabase()
    for name, kmod in T._kernels(main_mod).items():
        sch = s_tir.Schedule(kmod)  # one harmless step: a database ignores an empty trace
        sch.annotate(sch.get_sblock(sch.mod["main"].body.block.name_hint), "edgecut.test", 1)
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, db.commit_workload(kmod), [hot_secs], tvm_target,
            ms.arg_info.ArgInfo.from_prim_func(kmod["main"])))
    return db


def test_records_that_lose_in_place_are_dropped_and_others_kept(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 64, 3, 2, 1), nn.ReLU(), nn.Conv2d(64, 32, 3, 2, 1))
    mod, params = _import(model, (1, 16, 28, 28))
    main_mod = prepare(mod)[0]
    target = T._with_cores(__import__("edgecut").targets.get("local"))
    # a record of another model's kernel, already in the folder: it must survive
    other_mod, _ = _import(nn.Conv2d(3, 8, 5), (1, 3, 20, 20))
    other = prepare(other_mod)[0]
    T._save(tmp_path, other, target, T._best_records(other, target, [_naive_records(other, target)]))
    n_other = len(T.open_database(tmp_path).get_all_tuning_records())
    assert n_other >= 1

    res = T.select_in_place(mod, params, "local", main_mod, [_naive_records(main_mod, target)],
                            tmp_path, rounds=8, progress=False)
    conv = {n for n in T._kernels(main_mod) if "conv2d" in n}
    assert len(conv) == 2 and conv <= set(res.dropped)      # scalar convolutions lose in place
    assert set(res.kept) | set(res.dropped) == set(T._kernels(main_mod))
    db = T.open_database(tmp_path)   # (a small scalar transpose may win: the rule's gathers are slow)
    assert len(db.get_all_tuning_records()) == n_other + len(res.kept)
    for name, kmod in T._kernels(main_mod).items():
        assert (db.query_tuning_record(kmod, target, name) is None) == (name not in res.kept)
    for name, kmod in T._kernels(other).items():
        assert db.query_tuning_record(kmod, target, name) is not None


def test_kernel_times_see_a_slow_kernel_in_place():
    """The in-place timer tells the naive build's kernels from the scheduled ones (the fact the
    selection rests on), and names them as `prepare` does."""
    import tempfile

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 64, 3, 2, 1), nn.ReLU())
    mod, params = _import(model, (1, 16, 28, 28))
    main_mod = prepare(mod)[0]
    target = T._with_cores(__import__("edgecut").targets.get("local"))
    with tempfile.TemporaryDirectory() as d:
        T._save(__import__("pathlib").Path(d), main_mod, target,
                T._best_records(main_mod, target, [_naive_records(main_mod, target)]), keep_others=False)
        naive = build(mod, params, "local", tuning_dir=d)
    default = build(mod, params, "local", tuning_dir=False)
    x = T._inputs(mod, 1)
    t_def, t_naive = T._kernel_times([T._runner(default), T._runner(naive)], x, 5, progress=False)
    conv = [n for n in T._kernels(main_mod) if "conv2d" in n]
    assert conv and all(n in t_def and n in t_naive for n in conv)
    assert all(t_naive[n] > 3 * t_def[n] for n in conv), (t_naive, t_def)
    np.testing.assert_allclose(T._runner(naive)(x)[0], T._runner(default)(x)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_tune_end_to_end_never_slower(tmp_path):
    """A real (short) MetaSchedule search; what it keeps makes the model no slower end to end."""
    from edgecut import zoo

    model = zoo.get("tiny_chain")
    mod, params = _import(model, tuple(zoo.default_input_shape("tiny_chain")))
    res = T.tune(mod, params, "local", trials=16, work_dir=tmp_path, progress=False, rounds=10)
    assert res.path == tmp_path and (tmp_path / T.SEARCH / T.FILES[0]).exists()
    assert set(res.kept).isdisjoint(res.dropped)
    if res.kept:
        assert res.tuned_s <= res.default_s
