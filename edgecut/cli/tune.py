"""`edgecut tune MODEL --target T --trials N`: MetaSchedule search for a model's kernels.

The records go to the user's cache (`~/.cache/edgecut/tuning/<target>-<cpu>/`, or --work-dir),
where every later build for the same target finds them. A record is kept only if it makes its
kernel faster inside the running model than edgecut's default schedule, and only if the tuned
model is not slower end to end: a tuned build is never slower than the default one (up to the
noise of that comparison).
"""
from __future__ import annotations

import time


def register(sub) -> None:
    p = sub.add_parser("tune", help="tune a model's kernels with MetaSchedule (records reused by later builds)",
                       description="Tune the TVM kernels of MODEL for TARGET with MetaSchedule, within a "
                                   "budget of measured candidates, and save the records where later "
                                   "builds for that target pick them up.")
    p.add_argument("model", help="edgecut.zoo:NAME or path/to/file.py:Factory")
    p.add_argument("--target", default="local", help="target name (default: local); a target that does "
                   "not run here needs --rpc")
    p.add_argument("--trials", type=int, default=200, help="measured candidates in total (default: 200)")
    p.add_argument("--trials-per-task", type=int, default=None,
                   help="cap per kernel (default: trials / kernels, at least 8)")
    p.add_argument("--input", metavar="SHAPE", help="input shape, e.g. 1x3x224x224 (zoo models have a default)")
    p.add_argument("--work-dir", default=None, help="database folder (default: the user's cache)")
    p.add_argument("--rpc", metavar="HOST:PORT:KEY", default=None,
                   help="measure on a device through a tvm.rpc tracker, e.g. 10.0.0.5:9190:pi4")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to build or run one candidate")
    p.add_argument("--rounds", type=int, default=100,
                   help="interleaved runs of the in-place check of the records (default: 100)")
    p.set_defaults(func=run)


def _parse_rpc(text):
    from edgecut.errors import UsageError

    if text is None:
        return None
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        raise UsageError(f"--rpc {text!r}: expected HOST:PORT:KEY, e.g. 10.0.0.5:9190:pi4")
    return parts[0], int(parts[1]), parts[2]


def run(args) -> int:
    import torch

    from edgecut.cli._common import load_model_and_input
    from edgecut.codegen.tune import tune

    model, name, x = load_model_and_input(args.model, args.input)
    import tvm.relax.frontend.torch  # noqa: F401
    from tvm import relax

    with torch.no_grad():
        mod = relax.frontend.torch.from_fx(torch.fx.symbolic_trace(model), [(tuple(x.shape), "float32")],
                                           keep_params_as_input=True)
    mod, params = relax.frontend.detach_params(mod)
    t0 = time.perf_counter()
    res = tune(mod, params.get("main", []), args.target, trials=args.trials,
               trials_per_task=args.trials_per_task, work_dir=args.work_dir,
               rpc=_parse_rpc(args.rpc), timeout_s=args.timeout, rounds=args.rounds)
    print(f"tuned {name} for {args.target} in {time.perf_counter() - t0:.0f} s; records in {res.path}")
    print(f"kept {len(res.kept)} kernel record(s) that win in the model, dropped {len(res.dropped)} "
          f"that do not: {', '.join(res.dropped) or '-'}")
    if res.default_s is not None:
        print(f"end to end: default {res.default_s * 1e3:.2f} ms, tuned {res.tuned_s * 1e3:.2f} ms"
              + ("" if res.kept else " (slower or equal: nothing kept)"))
    return 0
