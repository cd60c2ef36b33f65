"""`edgecut demo`: train, compile, serve and co-infer on this machine, and report."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="the whole system on this machine: train exits, compile, serve, co-infer, report",
                       description="Train the early exit of a slim 64x64 AlexNet on scikit-learn's digits, compile "
                                   "it, start an edge server and a link emulator on loopback, calibrate an emulated "
                                   "device, run co-inferences at each bandwidth and deadline through the real "
                                   "runtime, print the table (predicted and measured latency per row) and write "
                                   "plan.png. The defaults show right-sizing, a partition and offloading.")
    p.add_argument("-o", "--output", default="demo-out", help="directory for the artifact and plan.png (default demo-out)")
    p.add_argument("--bandwidths", default="1mbit,10mbit,200mbit", help="comma-separated (default 1mbit,10mbit,200mbit)")
    p.add_argument("--deadlines", default="60ms", help="comma-separated (default 60ms)")
    p.add_argument("--requests", type=int, default=100, help="co-inferences per bandwidth and deadline (default 100)")
    p.add_argument("--device-macs", type=float, default=None,
                   help="the emulated device's multiply-accumulates per second (default 0.5e9, a slow Pi)")
    p.add_argument("--device-call", default=None,
                   help="the emulated device's time per library call (default 0.5ms)")
    p.add_argument("--rtt", default="10ms", help="round trip of the emulated link (default 10ms)")
    p.add_argument("--epochs", type=int, default=8, help="exit training epochs (default 8)")
    p.add_argument("--quantile", type=float, default=0.99,
                   help="quantile of the measured times the device and the edge plan with (default 0.99)")
    p.add_argument("--early-exit", action="store_true",
                   help="also answer from an earlier exit on the device when it is confident (BranchyNet); default "
                        "off: every request runs its plan's exit, so the measured latency is the plan's")
    p.add_argument("--artifact", help="reuse the artifact an earlier demo built (OUTPUT/artifact): no training or "
                                      "compiling (default: build one)")
    p.add_argument("--profile", help="cost profile of this machine, the edge (default: the shipped local profile); "
                                     "make one with `edgecut profile --target local`")
    p.set_defaults(func=run)


def run(args) -> int:
    from dataclasses import replace

    from edgecut.demo import run_demo
    from edgecut.errors import UsageError
    from edgecut.runtime.emulate import DEMO_DEVICE
    from edgecut.units import parse_bandwidth, parse_time

    if args.requests < 1 or args.epochs < 1:
        raise UsageError(f"--requests and --epochs must be >= 1, got {args.requests} and {args.epochs}")
    if not 0 < args.quantile < 1:
        raise UsageError(f"--quantile must be in (0, 1), e.g. 0.99, got {args.quantile}")
    device = DEMO_DEVICE
    if args.device_macs is not None:
        device = replace(device, macs_per_s=args.device_macs)
    if args.device_call is not None:
        device = replace(device, call_s=parse_time(args.device_call))
    run_demo(args.output, bandwidths=[parse_bandwidth(b) for b in args.bandwidths.split(",")],
             deadlines=[parse_time(d) for d in args.deadlines.split(",")], requests=args.requests,
             device=device, rtt=parse_time(args.rtt), epochs=args.epochs, profile=args.profile,
             quantile=args.quantile, early_exit=args.early_exit, artifact=args.artifact)
    return 0
