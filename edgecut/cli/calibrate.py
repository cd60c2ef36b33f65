"""`edgecut calibrate ARTIFACT --side device|edge [--out FILE]`: time every route's part here.

Torch-free: imports only edgecut.runtime.calibration (numpy, msgpack, the TVM runtime), so it
runs on a device with apache-tvm, numpy and msgpack.
"""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="time an artifact's device or edge parts on this machine",
                       description="Run every plan's device (or edge) part of ARTIFACT as built, with sleeps of "
                                   "0, 5 and 20 ms between calls as real requests leave, and save the p50/p90/p99 "
                                   "per plan beside the artifact (calibration-SIDE.json). `edgecut run` and "
                                   "`edgecut serve` plan with it; they make one at their first start if missing.")
    p.add_argument("artifact", help="artifact directory (holds manifest.msgpack)")
    p.add_argument("--side", choices=("device", "edge"), required=True, help="which side runs on this machine")
    p.add_argument("--out", metavar="FILE", help="where to save it (default: calibration-SIDE.json in ARTIFACT)")
    p.add_argument("--repeats", type=int, default=8, help="rounds of the idle pattern (default 8: 24 calls per plan)")
    p.add_argument("--backend", choices=("tvm", "onnxruntime"), default="tvm", help="how to run the parts")
    p.set_defaults(func=run)


def run(args) -> int:
    from edgecut.errors import UsageError
    from edgecut.runtime.calibration import calibrate, default_path

    if args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
    from edgecut.codegen.load import load

    part = load(args.artifact, args.side, args.backend)
    cal = calibrate(part, args.side, repeats=args.repeats)
    path = cal.save(Path(args.out) if args.out else default_path(part, args.side))
    print(f"{args.artifact}: {args.side} side on {cal.machine['cpu']} ({cal.machine['machine']}, "
          f"{cal.machine['cores']} cores), {len(cal.samples)} plans, idle pattern "
          f"{', '.join(f'{s * 1e3:g}' for s in cal.idle_pattern)} ms")
    print(f"{'plan':<24} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9}")
    for pid in cal.samples:
        q = cal.quantiles(pid)
        print(f"{pid:<24} {q['p50'] * 1e3:9.3f} {q['p90'] * 1e3:9.3f} {q['p99'] * 1e3:9.3f}")
    print(f"saved {path}")
    return 0
