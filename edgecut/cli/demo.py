"""`edgecut demo`: train, compile, serve and co-infer on this machine, and report."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="the whole system on this machine: train exits, compile, serve, co-infer, report",
                       description="Train Edgent's AlexNet exits on scikit-learn's digits, compile for two deadlines, "
                                   "start an edge server and a link emulator on loopback, run co-inferences at three "
                                   "bandwidths through the real runtime, print the table and write plan.png.")
    p.add_argument("-o", "--output", default="demo-out", help="directory for the artifacts and plan.png (default demo-out)")
    p.add_argument("--bandwidths", default="0.5mbit,2mbit,10mbit", help="comma-separated (default 0.5mbit,2mbit,10mbit)")
    p.add_argument("--deadlines", default="30ms,100ms", help="comma-separated (default 30ms,100ms)")
    p.add_argument("--requests", type=int, default=200, help="co-inferences per bandwidth and deadline (default 200)")
    p.add_argument("--device-macs", type=float, default=None,
                   help="the emulated device's multiply-accumulates per second (default 0.7e9, a Pi-class device)")
    p.add_argument("--device-call", default=None,
                   help="the emulated device's time per library call (default 0.5ms)")
    p.add_argument("--rtt", default="20ms", help="round trip of the emulated link (default 20ms)")
    p.add_argument("--epochs", type=int, default=15, help="exit training epochs (default 15)")
    p.add_argument("--profile", help="cost profile of this machine (default: the shipped local profile); "
                                     "make one with `edgecut profile --target local`")
    p.set_defaults(func=run)


def run(args) -> int:
    from dataclasses import replace

    from edgecut.demo import run_demo
    from edgecut.runtime.emulate import PI_CLASS
    from edgecut.units import parse_bandwidth, parse_time

    device = PI_CLASS
    if args.device_macs is not None:
        device = replace(device, macs_per_s=args.device_macs)
    if args.device_call is not None:
        device = replace(device, call_s=parse_time(args.device_call))
    run_demo(args.output, bandwidths=[parse_bandwidth(b) for b in args.bandwidths.split(",")],
             deadlines=[parse_time(d) for d in args.deadlines.split(",")], requests=args.requests,
             device=device, rtt=parse_time(args.rtt), epochs=args.epochs, profile=args.profile)
    return 0
